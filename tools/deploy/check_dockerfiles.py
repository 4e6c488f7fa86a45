"""Checks that the CPU and GPU Dockerfiles agree with each other and with the rendered manifests:
the same sources and binaries, user, entrypoint, port, ONNX Runtime folder, and, for the GPU image,
the TensorRT engine cache the GPU overlay mounts. The GPU image cannot be built here (its base is
NVIDIA's); hadolint lints it, and this keeps its paths from drifting from the CPU image, which the
container test runs.

    python tools/deploy/check_dockerfiles.py deploy/docker rendered/cpu.yaml rendered/gpu.yaml
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import yaml


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, (INSTRUCTION, arguments), grouped by stage."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        if op.upper() == "FROM":
            out.append([])
        if out:
            out[-1].append((op.upper(), rest.strip()))
    return out


def final(path: Path) -> dict:
    st = stages(path)
    last = st[-1]
    env = {}
    for op, rest in last:
        if op == "ENV":
            env.update(dict(kv.split("=", 1) for kv in shlex.split(rest)))
    one = lambda op: next((r for o, r in last if o == op), None)  # noqa: E731
    build = next(s for s in st if "AS build" in s[0][1])
    return {
        "user": one("USER"),
        "entrypoint": one("ENTRYPOINT"),
        "cmd": one("CMD"),
        "expose": one("EXPOSE"),
        # The probe itself; its timings may differ (a GPU worker loads engines for longer).
        "healthcheck": (one("HEALTHCHECK") or "").partition("CMD")[2].strip(),
        "env": env,
        "copies": sorted(r for o, r in last if o == "COPY"),
        "sources": [r for o, r in build if o == "COPY"],
        "cargo": next(r for o, r in build if o == "RUN" and "cargo build" in r),
        "runs": " ".join(r for o, r in last if o == "RUN"),
    }


def worker_pod(rendered: Path) -> tuple[dict, dict, dict]:
    docs = [d for d in yaml.safe_load_all(rendered.read_text()) if d]
    deploy = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "ddit-worker")
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "ddit-worker")
    pod = deploy["spec"]["template"]["spec"]
    worker = next(c for c in pod["containers"] if c["name"] == "worker")
    return pod, worker, config["data"]


def check(docker: Path, cpu_yaml: Path, gpu_yaml: Path) -> list[str]:
    cpu, gpu = final(docker / "Dockerfile.cpu"), final(docker / "Dockerfile.gpu")
    errors = []
    same = lambda what, a, b: a == b or errors.append(f"{what}: cpu {a!r} != gpu {b!r}")  # noqa: E731
    for key in ("user", "entrypoint", "cmd", "expose", "healthcheck", "sources"):
        same(key, cpu[key], gpu[key])
    for var in ("DDIT_LISTEN", "DDIT_LOG"):
        same(var, cpu["env"].get(var), gpu["env"].get(var))
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (docker / name).read_text()
        if "<<" in text:
            errors.append(f"{name}: a heredoc (buildah before 1.33, Debian's podman 4.3, cannot read it)")
        if "scripts/ort.sh" not in text:
            errors.append(f"{name}: ONNX Runtime's libraries not taken by scripts/ort.sh")
    for image in (cpu, gpu):
        lib = image["env"].get("DDIT_ORT_LIBRARY", "")
        if not lib.startswith("/opt/ort/lib/"):
            errors.append(f"DDIT_ORT_LIBRARY {lib!r} is not under /opt/ort/lib/")
        for copy in ("--from=build /out/bin/ /usr/local/bin/", "--from=ort /out/ort/ /opt/ort/lib/"):
            if copy not in image["copies"]:
                errors.append(f"a final stage lacks COPY {copy}")
        if "-p ddit-worker -p ddit-export" not in image["cargo"]:
            errors.append(f"the build stage does not build both binaries: {image['cargo']}")
    for name, image, rendered in (("cpu", cpu, cpu_yaml), ("gpu", gpu, gpu_yaml)):
        pod, worker, data = worker_pod(rendered)
        uid = str(pod["securityContext"]["runAsUser"])
        if image["user"] != uid:
            errors.append(f"{name}: USER {image['user']} but the manifests run as {uid}")
        port = data["DDIT_LISTEN"].rsplit(":", 1)[1]
        ports = {str(p["containerPort"]) for p in worker.get("ports", [])}
        if image["expose"] != port or port not in ports:
            errors.append(f"{name}: EXPOSE {image['expose']}, DDIT_LISTEN {port}, containerPorts {ports}")
        if name == "gpu":
            cache = data.get("DDIT_TRT_CACHE_DIR")
            mounts = {m["mountPath"] for m in worker.get("volumeMounts", [])}
            if cache != image["env"].get("DDIT_TRT_CACHE_DIR") or cache not in mounts:
                errors.append(f"gpu: TensorRT cache {cache!r} is not the image's and a mount {mounts}")
            if f"chown {uid} {cache}" not in image["runs"]:
                errors.append(f"gpu: the image does not give {cache} to uid {uid}")
    return errors


if __name__ == "__main__":
    errs = check(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
    for e in errs:
        print(f"check_dockerfiles: {e}", file=sys.stderr)
    sys.exit(1 if errs else 0)
