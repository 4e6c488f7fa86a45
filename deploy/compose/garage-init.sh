#!/usr/bin/env bash
# Initialises the compose Garage node: layout, the access key from AWS_ACCESS_KEY_ID /
# AWS_SECRET_ACCESS_KEY and the bucket DDIT_S3_BUCKET. Idempotent (safe on every `compose up`).
set -euo pipefail
g=(garage -c /etc/garage.toml)
for _ in $(seq 1 60); do "${g[@]}" status >/dev/null 2>&1 && break; sleep 1; done
if "${g[@]}" layout show 2>/dev/null | grep -q "No nodes currently have a role"; then
  id="$("${g[@]}" node id -q | cut -d@ -f1)"
  "${g[@]}" layout assign -z dc1 -c 10G "$id"
  "${g[@]}" layout apply --version 1
fi
if ! "${g[@]}" key info "$AWS_ACCESS_KEY_ID" >/dev/null 2>&1; then
  "${g[@]}" key import --yes -n ddit "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY"
fi
"${g[@]}" key allow --create-bucket "$AWS_ACCESS_KEY_ID"
"${g[@]}" bucket info "$DDIT_S3_BUCKET" >/dev/null 2>&1 || "${g[@]}" bucket create "$DDIT_S3_BUCKET"
"${g[@]}" bucket allow --read --write --owner "$DDIT_S3_BUCKET" --key "$AWS_ACCESS_KEY_ID"
echo "garage ready: bucket $DDIT_S3_BUCKET"
