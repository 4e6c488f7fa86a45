"""What the Kubernetes manifests ask of each container, as JSON, for the container test
(tests/e2e/container.rs), so that the test runs the image under the manifests' own user, arguments,
settings, mounts and probes and cannot drift from them.

    python tools/deploy/container_spec.py deploy/k8s/base > spec.json

One object per container (`worker`, `fetch-model`, `gateway`):
  args, user, group, fs_group, read_only_root, drop_all_caps, no_new_privileges,
  grace_seconds, memory_limit, env ([name, value] pairs: the ConfigMap's data, then the container's own `env`;
  a `valueFrom` field is given as null), secret_env (the names the Secret provides), ports
  ({name: number}), mounts ([{path, read_only, volume, kind, keys}]), probes
  ({startup|liveness|readiness: {path, port, period, timeout, failures}}). A field the test cannot
  carry (a `command`, a container-level user, a subPath, a valueFrom other than the pod's name)
  stops it with an error instead of being dropped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from render_kustomize import render


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d.get("kind") == kind}


def env_of(container: dict, maps: dict, secrets: dict) -> tuple[list, list]:
    env, secret_env = [], []
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env += [[k, str(v)] for k, v in maps[src["configMapRef"]["name"]]["data"].items()]
        if "secretRef" in src:
            secret_env += list(secrets[src["secretRef"]["name"]].get("stringData", {}))
    for e in container.get("env", []):
        env = [p for p in env if p[0] != e["name"]]
        if "value" in e:
            env.append([e["name"], str(e["value"])])
        elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env.append([e["name"], None])  # the pod's name
        else:
            sys.exit(f"container_spec: {container['name']}: env {e['name']} comes from {e}, "
                     "which the container test cannot give")
    return env, secret_env


def mounts_of(container: dict, volumes: dict, secrets: dict) -> list[dict]:
    out = []
    for m in container.get("volumeMounts", []):
        vol = volumes[m["name"]]
        if m.get("subPath"):
            sys.exit(f"container_spec: {container['name']}: subPath mounts are not carried")
        if "secret" in vol:
            if "items" in vol["secret"]:
                sys.exit(f"container_spec: volume {m['name']}: secret items are not carried")
            secret = secrets[vol["secret"]["secretName"]]
            kind, keys = "secret", sorted({**secret.get("data", {}), **secret.get("stringData", {})})
        else:
            kind, keys = ("emptyDir" if "emptyDir" in vol else "other"), []
        out.append({"path": m["mountPath"], "read_only": bool(m.get("readOnly")),
                    "volume": m["name"], "kind": kind, "keys": keys})
    return out


def probes_of(container: dict, ports: dict) -> dict:
    out = {}
    for kind in ("startup", "liveness", "readiness"):
        probe = container.get(f"{kind}Probe")
        if probe:
            port = probe["httpGet"]["port"]
            out[kind] = {"path": probe["httpGet"]["path"], "port": ports.get(port, port),
                         "period": probe.get("periodSeconds", 10),
                         "timeout": probe.get("timeoutSeconds", 1),
                         "failures": probe.get("failureThreshold", 3)}
    return out


def spec(container: dict, pod: dict, maps: dict, secrets: dict) -> dict:
    sec = pod.get("securityContext", {})
    csec = container.get("securityContext", {})
    # What the test cannot carry fails here rather than being dropped silently.
    for key in ("command", "workingDir"):
        if key in container:
            sys.exit(f"container_spec: {container['name']}: `{key}` is not carried by the test")
    for key in ("runAsUser", "runAsGroup", "runAsNonRoot"):
        if key in csec:
            sys.exit(f"container_spec: {container['name']}: container-level {key} is not carried")
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    env, secret_env = env_of(container, maps, secrets)
    return {
        "args": container.get("args", []),
        "user": sec.get("runAsUser"),
        "group": sec.get("runAsGroup"),
        "fs_group": sec.get("fsGroup"),
        "read_only_root": bool(csec.get("readOnlyRootFilesystem")),
        "drop_all_caps": "ALL" in csec.get("capabilities", {}).get("drop", []),
        "no_new_privileges": csec.get("allowPrivilegeEscalation") is False,
        "grace_seconds": pod.get("terminationGracePeriodSeconds", 30),
        "memory_limit": container.get("resources", {}).get("limits", {}).get("memory"),
        "env": env,
        "secret_env": secret_env,
        "ports": ports,
        "mounts": mounts_of(container, volumes, secrets),
        "probes": probes_of(container, ports),
    }


def main(folder: Path) -> dict:
    docs = render(folder)
    maps, secrets = by_kind(docs, "ConfigMap"), by_kind(docs, "Secret")
    out = {}
    for name, deploy in by_kind(docs, "Deployment").items():
        pod = deploy["spec"]["template"]["spec"]
        for c in pod.get("initContainers", []) + pod["containers"]:
            out[c["name"]] = spec(c, pod, maps, secrets) | {"deployment": name}
    return out


if __name__ == "__main__":
    json.dump(main(Path(sys.argv[1])), sys.stdout, indent=1)
