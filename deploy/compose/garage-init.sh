#!/usr/bin/env bash
# Initialises the compose Garage node: layout, the access key from AWS_ACCESS_KEY_ID /
# AWS_SECRET_ACCESS_KEY and the bucket DDIT_S3_BUCKET. Idempotent (safe on every `compose up`).
set -euo pipefail
g=(garage -c /etc/garage.toml)
for _ in $(seq 1 60); do "${g[@]}" status >/dev/null 2>&1 && break; sleep 1; done
# Match on the captured output: `garage … | grep -q` closes the pipe early, garage aborts on the broken
# pipe, and under pipefail the test would read as "no match" and skip the layout.
layout="$("${g[@]}" layout show 2>&1 || true)"
if [[ "$layout" == *"No nodes currently have a role"* ]]; then
  id="$("${g[@]}" node id -q | cut -d@ -f1)"
  "${g[@]}" layout assign -z dc1 -c 10G "$id"
  "${g[@]}" layout apply --version 1
fi
# A freshly applied layout takes a moment to become active; retry the key import until it is.
if ! "${g[@]}" key info "$AWS_ACCESS_KEY_ID" >/dev/null 2>&1; then
  for i in $(seq 1 30); do
    "${g[@]}" key import --yes -n ddit "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" && break
    [[ $i == 30 ]] && { echo "garage: could not import the key" >&2; exit 1; }
    sleep 1
  done
fi
"${g[@]}" key allow --create-bucket "$AWS_ACCESS_KEY_ID"
"${g[@]}" bucket info "$DDIT_S3_BUCKET" >/dev/null 2>&1 || "${g[@]}" bucket create "$DDIT_S3_BUCKET"
"${g[@]}" bucket allow --read --write --owner "$DDIT_S3_BUCKET" --key "$AWS_ACCESS_KEY_ID"
echo "garage ready: bucket $DDIT_S3_BUCKET"
