#!/usr/bin/env bash
# Builds the worker images with podman, without a Docker engine or a container registry:
#   scripts/images.sh        the CPU image (deploy/docker/Dockerfile.cpu) as localhost/ddit-worker:cpu
#   scripts/images.sh gpu    also the GPU Dockerfile's image, on a Debian stand-in for NVIDIA's base
#                            (it builds and starts, but has no CUDA: a packaging check, not a GPU image;
#                            it also carries the build bases' CA bundle, below: never ship it)
# Each image's id goes to .ddit/images/{cpu,gpu-standin}.id: the container test runs exactly the
# image this tree built, whatever the shared tags point at. Runs as root (or with sudo).
#
# The Dockerfiles name their usual public bases (rust:…, python:…, debian:…-slim). Here each is
# replaced, through the Dockerfile's own build arguments, by a local base made from Debian's
# packages: `mmdebstrap --variant=minbase bookworm`, imported with `podman import`, plus python3 for
# the ONNX Runtime stage and gcc and this machine's Rust toolchain for the build stage (the one
# toolchain it has; none can be fetched). The bases are made once and kept; DDIT_IMAGES_REBASE=1
# makes them again. Prints the image's size as its last line.
#
# The build-stage bases (rust, python) also carry this machine's CA bundle, which may hold an
# egress proxy's CA, so cargo and pip can reach crates.io and PyPI; the runtime image does not.
#
# podman runs with Debian's runc: its default crun fails on this kernel's hybrid cgroups. Containers
# need explicit rlimits (`--ulimit nofile=1024:1024 --ulimit nproc=1000:1000`), see PODMAN_RUN below.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
case "${1:-}" in
  "" | gpu) ;;
  *) echo "usage: $0 [gpu]" >&2; exit 2 ;;
esac
STATE=.ddit/images
mkdir -p "$STATE"
log() { echo "images: $*" >&2; }
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

missing=()
for tool in podman runc mmdebstrap slirp4netns newuidmap; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  log "installing podman, runc, mmdebstrap, slirp4netns, uidmap (Debian): ${missing[*]} missing"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    podman runc mmdebstrap uidmap slirp4netns >&2
fi
[[ -f /etc/ssl/certs/ca-certificates.crt ]] || {
  echo "images: /etc/ssl/certs/ca-certificates.crt missing (Debian package ca-certificates)" >&2
  exit 1
}
podman() { command podman --runtime runc "$@"; }

LOCAL=localhost/ddit-base
DEBIAN_BASE=$LOCAL/debian:bookworm-slim
PYTHON_BASE=$LOCAL/python:3.11-slim-bookworm
RUST_BASE=$LOCAL/rust:1.95-slim-bookworm
have() { [[ "${DDIT_IMAGES_REBASE:-}" != 1 ]] && podman image exists "$1"; }
cp /etc/ssl/certs/ca-certificates.crt "$STATE/host-ca.crt"
TRUST=('COPY host-ca.crt /etc/ssl/certs/ca-certificates.crt'
  'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt CARGO_HTTP_CAINFO=/etc/ssl/certs/ca-certificates.crt')

if ! have "$DEBIAN_BASE"; then
  log "making $DEBIAN_BASE (mmdebstrap --variant=minbase bookworm)"
  rm -f "$STATE/rootfs.tar"
  mmdebstrap --quiet --variant=minbase bookworm "$STATE/rootfs.tar" >&2
  podman import --quiet --change 'CMD ["/bin/bash"]' "$STATE/rootfs.tar" "$DEBIAN_BASE" >/dev/null
  rm -f "$STATE/rootfs.tar"
fi
if ! have "$PYTHON_BASE"; then
  log "making $PYTHON_BASE (python3 and pip from Debian)"
  printf '%s\n' "FROM $DEBIAN_BASE" \
    'RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends python3 python3-pip ca-certificates && rm -rf /var/lib/apt/lists/*' \
    "${TRUST[@]}" \
    'ENV PIP_BREAK_SYSTEM_PACKAGES=1' >"$STATE/Containerfile.python"
  podman build --quiet --network host -f "$STATE/Containerfile.python" -t "$PYTHON_BASE" "$STATE" >/dev/null
fi
# The Rust base is remade when this machine's toolchain changes (its version is a label).
RUSTC="$(rustc --version)"
if have "$RUST_BASE" &&
  [[ "$(podman image inspect --format '{{index .Labels "ddit.rustc"}}' "$RUST_BASE")" != "$RUSTC" ]]; then
  podman rmi "$RUST_BASE" >/dev/null
fi
if ! have "$RUST_BASE"; then
  SYSROOT="$(rustc --print sysroot)"
  if [[ ! -x "$SYSROOT/bin/cargo" || ! -d "$SYSROOT/lib/rustlib" ]]; then
    echo "images: $SYSROOT is not a rustup toolchain (bin/cargo, lib/rustlib); install Rust with rustup" >&2
    exit 1
  fi
  log "making $RUST_BASE (gcc from Debian, the toolchain at $SYSROOT)"
  # Where the official rust image keeps it: RUSTUP_HOME/CARGO_HOME under /usr/local.
  printf '%s\n' "FROM $DEBIAN_BASE" \
    'RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends gcc libc6-dev ca-certificates && rm -rf /var/lib/apt/lists/*' \
    "${TRUST[@]}" \
    'RUN mkdir -p /usr/local/rust /usr/local/cargo && cp -a /toolchain/bin /toolchain/lib /usr/local/rust/' \
    'ENV CARGO_HOME=/usr/local/cargo PATH=/usr/local/rust/bin:/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    'RUN cargo --version && rustc --version' >"$STATE/Containerfile.rust"
  podman build --quiet --network host -v "$SYSROOT:/toolchain:ro" --label "ddit.rustc=$RUSTC" \
    -f "$STATE/Containerfile.rust" -t "$RUST_BASE" "$STATE" >/dev/null
fi

BASES=(--build-arg "RUST_IMAGE=$RUST_BASE" --build-arg "PYTHON_IMAGE=$PYTHON_BASE")
log "building localhost/ddit-worker:cpu from deploy/docker/Dockerfile.cpu"
podman build --format docker --network host "${BASES[@]}" --build-arg "RUNTIME_IMAGE=$DEBIAN_BASE" \
  --iidfile "$STATE/cpu.id" -f deploy/docker/Dockerfile.cpu -t localhost/ddit-worker:cpu . >&2
if [[ "${1:-}" = gpu ]]; then
  log "building localhost/ddit-worker:gpu-standin (GPU_BASE = $PYTHON_BASE, no CUDA)"
  podman build --format docker --network host "${BASES[@]}" --build-arg "GPU_BASE=$PYTHON_BASE" \
    --iidfile "$STATE/gpu-standin.id" -f deploy/docker/Dockerfile.gpu \
    -t localhost/ddit-worker:gpu-standin . >&2
fi
# Build-stage images a day old go (they are the layer cache of the builds since); the cargo cache
# mount stays, so a build after that recompiles only what changed.
podman image prune -f --filter until=24h >/dev/null
size=$(podman image inspect --format '{{.Size}}' localhost/ddit-worker:cpu)
echo "images: localhost/ddit-worker:cpu $((size / 1000000)) MB"
