#!/usr/bin/env bash
# The soak test at full size: N jobs (default 2,000; 10,000 is the release gate) and 1,000 fuzzed
# bad ones on 3 workers, through SIGKILL of a random worker every 20 s, a broker restart
# (rabbitmqctl stop_app/start_app), a restart of the test's own Redis (AOF, spare port), a 15 s
# SeaweedFS outage, jobs that fail transiently forever and jobs published twice at once.
#   scripts/soak.sh [--jobs N] [--fuzz F]
# Its last line is
#   soak: jobs=N lost=0 duplicates=0 mismatched=0 without_result=0 dead_lettered=D panics=0
# and it fails when any counter but dead_lettered is above 0. It stops by itself (a time limit of
# 10 minutes plus N/5 seconds for the jobs to end). scripts/test.sh runs a short one (300 jobs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
JOBS=2000
FUZZ=1000
while [[ $# -gt 0 ]]; do
  case "$1" in
    --jobs) JOBS="$2"; shift 2 ;;
    --fuzz) FUZZ="$2"; shift 2 ;;
    *) echo "usage: $0 [--jobs N] [--fuzz F]" >&2; exit 2 ;;
  esac
done
ORT_DYLIB_PATH="$(scripts/ort.sh)"
export ORT_DYLIB_PATH
scripts/services.sh up
# shellcheck disable=SC1091
source .ddit/services/env
cargo build --workspace --bins
DDIT_SOAK_JOBS="$JOBS" DDIT_SOAK_FUZZ="$FUZZ" \
  cargo test -p ddit-e2e --test soak -- --nocapture 2>&1 | tee .ddit/soak.log | grep '^soak:'
