#!/usr/bin/env bash
# The soak test at full size: N good jobs (default 2,000; 10,000 is the release gate), F fuzzed
# bad ones (default N/2), hostile ones, jobs failing transiently forever and jobs published twice,
# on 3 workers. With --chaos: SIGKILL of a random worker every 20 s, a broker restart (rabbitmqctl
# stop_app/start_app), a SHUTDOWN and start of the test's own Redis (the deploy manifests' RDB
# persistence, spare port), a 30 s SeaweedFS outage and SIGTERM of a worker under load.
#   scripts/soak.sh [--jobs N] [--fuzz F] [--chaos]
# Its output ends with the one line
#   soak: jobs=N lost=0 duplicates=0 ran_twice=R mismatched=0 without_result=0 empty_success=0 good_dead_lettered=0 dead_lettered=D panics=0
# and it fails when a counter but ran_twice and dead_lettered is above 0 or a job never ended (a
# time limit of 10 minutes plus N/5 seconds after the last publish). The whole log is in
# .ddit/soak.log. scripts/test.sh runs a short one through `cargo test` (200 jobs, chaos on).
# See docs/soak.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
JOBS=2000
FUZZ=""
CHAOS=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --jobs) JOBS="$2"; shift 2 ;;
    --fuzz) FUZZ="$2"; shift 2 ;;
    --chaos) CHAOS=1; shift ;;
    *) echo "usage: $0 [--jobs N] [--fuzz F] [--chaos]" >&2; exit 2 ;;
  esac
done
FUZZ="${FUZZ:-$((JOBS / 2))}"
mkdir -p .ddit
: >.ddit/soak.log
ORT_DYLIB_PATH="$(scripts/ort.sh)"
export ORT_DYLIB_PATH
scripts/services.sh up 2>>.ddit/soak.log
# shellcheck disable=SC1091
source .ddit/services/env
cargo build --workspace --bins 2>>.ddit/soak.log
cargo test -p ddit-e2e --test soak --no-run 2>>.ddit/soak.log
status=0
DDIT_SOAK_JOBS="$JOBS" DDIT_SOAK_FUZZ="$FUZZ" DDIT_SOAK_CHAOS="$CHAOS" \
  cargo test -p ddit-e2e --test soak soak -- --exact --nocapture >>.ddit/soak.log 2>&1 || status=$?
line="$(grep '^soak: jobs=' .ddit/soak.log | tail -1 || true)"
if [[ -z "$line" ]]; then
  tail -30 .ddit/soak.log >&2
  echo "soak: no tally line (the test failed before it; .ddit/soak.log)" >&2
  exit 1
fi
echo "$line"
exit "$status"
