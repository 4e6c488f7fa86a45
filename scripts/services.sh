#!/usr/bin/env bash
# Test services on loopback: RabbitMQ (5672), Redis (6379) and Garage S3 (3900).
#   scripts/services.sh up       install what is missing, start what is stopped, create the S3 key and bucket
#   scripts/services.sh status   show what runs
#   scripts/services.sh down     stop Garage (RabbitMQ and Redis are left to the machine)
#   scripts/services.sh env      print the variables the tests and workers use
# Idempotent: does nothing for a service that already answers. Garage is built once with
# `cargo install garage@2.5.0 --locked` (about 17 minutes on 2 cores) and cached in $GARAGE_ROOT.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${DDIT_SERVICES_DIR:-$ROOT/.ddit/services}"
GARAGE_ROOT="${GARAGE_ROOT:-/opt/garage}"
GARAGE="$GARAGE_ROOT/bin/garage"
# Garage's config and data live outside the checkout, so every clone on the machine (CI's fresh clone
# included) finds and administers the same single-node instance.
GARAGE_STATE="${GARAGE_STATE:-/var/lib/ddit-garage}"
CONF="$GARAGE_STATE/garage.toml"
# Fixed test credentials (loopback only): a Garage key id is GK + 24 hex digits.
KEY_ID="GK0ddit0000000000000000001"
KEY_SECRET="0ddit0test0secret000000000000000000000000000000000000000000000001"
BUCKET="${DDIT_TEST_BUCKET:-ddit-test}"

log() { echo "services: $*" >&2; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { for _ in $(seq 1 "${2:-60}"); do port_open "$1" && return 0; sleep 1; done; return 1; }
apt_install() {
  if [[ -z "${APT_UPDATED:-}" ]]; then DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

redis_up() {
  port_open 6379 && return 0
  command -v redis-server >/dev/null || apt_install redis-server
  log "starting redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ddit.log
  wait_port 6379 30
}

rabbit_up() {
  port_open 5672 && return 0
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  log "starting rabbitmq"
  rabbitmq-server -detached
  wait_port 5672 120
  # The AMQP port opens before the broker accepts work; wait until it answers.
  for _ in $(seq 1 60); do rabbitmqctl -q await_startup >/dev/null 2>&1 && break; sleep 1; done
}

garage_install() {
  [[ -x "$GARAGE" ]] && return 0
  log "building garage 2.5.0 into $GARAGE_ROOT (once; about 17 minutes on 2 cores)"
  cargo install garage@2.5.0 --locked --root "$GARAGE_ROOT" >&2
}

garage_conf() {
  mkdir -p "$GARAGE_STATE/meta" "$GARAGE_STATE/data"
  [[ -f "$CONF" ]] && return 0
  cat > "$CONF" <<CONF
metadata_dir = "$GARAGE_STATE/meta"
data_dir = "$GARAGE_STATE/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:3901"
rpc_public_addr = "127.0.0.1:3901"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"

[s3_api]
s3_region = "us-east-1"
api_bind_addr = "127.0.0.1:3900"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:3903"
CONF
}

garage_up() {
  garage_install
  garage_conf
  if ! port_open 3900; then
    log "starting garage"
    nohup "$GARAGE" -c "$CONF" server > "$GARAGE_STATE/garage.log" 2>&1 &
    echo $! > "$GARAGE_STATE/garage.pid"
    wait_port 3900 60 || { cat "$GARAGE_STATE/garage.log" >&2; return 1; }
  fi
  local g=("$GARAGE" -c "$CONF")
  for _ in $(seq 1 30); do "${g[@]}" status >/dev/null 2>&1 && break; sleep 1; done
  # Read the whole output before matching: `garage … | grep -q` would close the pipe early, garage
  # aborts on the broken pipe, and under pipefail the check would read as "no match".
  local layout
  layout="$("${g[@]}" layout show 2>&1 || true)"
  if [[ "$layout" == *"No nodes currently have a role"* ]]; then
    local id
    id="$("${g[@]}" node id -q 2>/dev/null | cut -d@ -f1)"
    "${g[@]}" layout assign -z dc1 -c 1G "$id" >&2
    "${g[@]}" layout apply --version 1 >&2
  fi
  # A freshly applied layout takes a moment to become active; key and bucket calls fail until then.
  if ! "${g[@]}" key info "$KEY_ID" >/dev/null 2>&1; then
    local ok=""
    for _ in $(seq 1 30); do
      if "${g[@]}" key import --yes -n ddit-test "$KEY_ID" "$KEY_SECRET" >&2; then ok=1; break; fi
      sleep 1
    done
    [[ -n "$ok" ]] || { log "garage: could not import the test key"; return 1; }
  fi
  "${g[@]}" key allow --create-bucket "$KEY_ID" >/dev/null 2>&1 || true
  if ! "${g[@]}" bucket info "$BUCKET" >/dev/null 2>&1; then
    "${g[@]}" bucket create "$BUCKET" >&2
  fi
  "${g[@]}" bucket allow --read --write --owner "$BUCKET" --key "$KEY_ID" >/dev/null 2>&1
}

print_env() {
  cat <<ENV
export AWS_ACCESS_KEY_ID=$KEY_ID
export AWS_SECRET_ACCESS_KEY=$KEY_SECRET
export AWS_REGION=us-east-1
export DDIT_S3_ENDPOINT=http://127.0.0.1:3900
export DDIT_S3_BUCKET=$BUCKET
export DDIT_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f
export DDIT_REDIS_URL=redis://127.0.0.1:6379
ENV
}

case "${1:-up}" in
  up)
    mkdir -p "$STATE"
    redis_up
    rabbit_up
    garage_up
    print_env > "$STATE/env"
    log "up: redis 6379, rabbitmq 5672, garage s3 3900 (variables in $STATE/env)"
    ;;
  status)
    for p in 6379 5672 3900; do if port_open $p; then echo "127.0.0.1:$p open"; else echo "127.0.0.1:$p closed"; fi; done
    ;;
  down)
    if [[ -f "$GARAGE_STATE/garage.pid" ]]; then kill "$(cat "$GARAGE_STATE/garage.pid")" 2>/dev/null || true; rm -f "$GARAGE_STATE/garage.pid"; fi
    ;;
  env) print_env ;;
  *) echo "usage: $0 up|status|down|env" >&2; exit 2 ;;
esac
