"""Validates the Kubernetes manifests under deploy/k8s offline.

    python tools/deploy/validate_k8s.py RENDERED.yaml [...]

Core kinds (Deployment, ConfigMap, Secret, Service, PodDisruptionBudget, PVC, Namespace) are checked
with `kubernetes-validate` (PyPI) against the Kubernetes OpenAPI schemas in strict mode (unknown
fields are errors). KEDA kinds (ScaledObject, TriggerAuthentication) are checked by
tools/deploy/validate_keda.mjs with the schema of the `@kubernetes-models/keda` npm package: no
PyPI or crates package carries KEDA's CRD schemas. Beyond the schemas, the checks here hold the
manifests to the fleet's own rules (grace period above the shutdown deadline, probes, KEDA bounds).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import yaml

K8S_VERSION = "1.33"
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication", "ScaledJob", "ClusterTriggerAuthentication"}
HERE = Path(__file__).resolve().parent


def worker_rules(spec: dict, name: str, cms: dict, source: str) -> list[str]:
    """A worker drains before its kill, runs the image matching its device, fetches its model."""
    errs = []
    grace = spec.get("terminationGracePeriodSeconds", 30)
    deadline = None
    for ref in spec["containers"][0].get("envFrom", []):
        cm = ref.get("configMapRef", {}).get("name")
        if cm in cms and "DDIT_SHUTDOWN_DEADLINE" in cms[cm]:
            deadline = int(cms[cm]["DDIT_SHUTDOWN_DEADLINE"])
    if deadline is None:
        errs.append(f"{source}: Deployment/{name}: DDIT_SHUTDOWN_DEADLINE is not set by its ConfigMap")
    elif grace <= deadline:
        errs.append(f"{source}: Deployment/{name}: terminationGracePeriodSeconds {grace} "
                    f"must exceed DDIT_SHUTDOWN_DEADLINE {deadline}")
    gpu = any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in spec["containers"])
    for c in spec["containers"] + spec.get("initContainers", []):
        tag = c.get("image", "").rsplit(":", 1)[-1]
        if gpu and tag.startswith("cpu"):
            errs.append(f"{source}: Deployment/{name}: requests a GPU but runs the CPU image {c['image']}")
    if not spec.get("initContainers"):
        errs.append(f"{source}: Deployment/{name}: no init container fetches the model package")
    return errs


def gateway_rules(spec: dict, name: str, hpa_targets: set, source: str) -> list[str]:
    """A gateway is autoscaled and reads its clients from a mounted Secret, by file."""
    errs = []
    if name not in hpa_targets:
        errs.append(f"{source}: Deployment/{name}: no HorizontalPodAutoscaler scales the gateway")
    c = spec["containers"][0]
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    tokens = env.get("DDIT_TOKENS_FILE")
    mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
    secrets = {v["name"] for v in spec.get("volumes", []) if "secret" in v}
    if not tokens or not any(tokens.startswith(mounts[v] + "/") for v in secrets if v in mounts):
        errs.append(f"{source}: Deployment/{name}: DDIT_TOKENS_FILE must be a file of a mounted Secret")
    return errs


def fleet_rules(docs: list[dict], source: str) -> list[str]:
    """The deployment's own invariants; each failure names the document and field."""
    errs = []
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    cms = {c["metadata"]["name"]: c.get("data", {}) for c in by_kind.get("ConfigMap", [])}
    hpa_targets = {h["spec"]["scaleTargetRef"]["name"] for h in by_kind.get("HorizontalPodAutoscaler", [])}
    for dep in by_kind.get("Deployment", []):
        name = dep["metadata"]["name"]
        spec = dep["spec"]["template"]["spec"]
        for c in spec["containers"]:
            for probe in ("livenessProbe", "readinessProbe"):
                if probe not in c:
                    errs.append(f"{source}: Deployment/{name}: container {c['name']} has no {probe}")
            if "resources" not in c or "requests" not in c["resources"]:
                errs.append(f"{source}: Deployment/{name}: container {c['name']} has no resource requests")
        role = (spec["containers"][0].get("args") or ["?"])[0]
        if role == "serve":
            errs += worker_rules(spec, name, cms, source)
        elif role == "gateway":
            errs += gateway_rules(spec, name, hpa_targets, source)
        else:
            errs.append(f"{source}: Deployment/{name}: runs `{role}`, neither `serve` nor `gateway`")
    for sec in by_kind.get("Secret", []):
        for key, url in sec.get("stringData", {}).items():
            scheme = str(url).split("://", 1)[0] if "://" in str(url) else None
            if scheme in {"amqp", "redis", "http"} and not url.startswith("http://127.0.0.1"):
                errs.append(f"{source}: Secret/{sec['metadata']['name']}: {key} uses {scheme}:// "
                            "(connections leave the pod: use amqps://, rediss:// or https://)")
    for so in by_kind.get("ScaledObject", []):
        s = so["spec"]
        name = so["metadata"]["name"]
        lo, hi = s.get("minReplicaCount", 0), s.get("maxReplicaCount", 100)
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            errs.append(f"{source}: ScaledObject/{name}: minReplicaCount above maxReplicaCount")
        target = s["scaleTargetRef"]["name"]
        if target not in {d["metadata"]["name"] for d in by_kind.get("Deployment", [])}:
            errs.append(f"{source}: ScaledObject/{name}: scaleTargetRef {target} is not a Deployment here")
        for t in s["triggers"]:
            if t["type"] == "rabbitmq" and t["metadata"].get("protocol") != "http":
                errs.append(f"{source}: ScaledObject/{name}: the rabbitmq trigger must use protocol http "
                            "(counts unacknowledged messages, so busy pods are not scaled away)")
    return errs


def main() -> int:
    errors, counts = [], {}
    keda_docs = []
    for path in sys.argv[1:]:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
        for d in docs:
            kind = d.get("kind", "?")
            where = f"{path}: {kind}/{d.get('metadata', {}).get('name', '?')}"
            counts[kind] = counts.get(kind, 0) + 1
            if kind in KEDA_KINDS:
                keda_docs.append({"where": where, "doc": d})
                continue
            try:
                kubernetes_validate.validate(d, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                errors.append(f"{where}: {'.'.join(str(p) for p in e.path)}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                errors.append(f"{where}: no Kubernetes {K8S_VERSION} schema: {e}")
        errors += fleet_rules(docs, path)
    if keda_docs:
        r = subprocess.run(["node", str(HERE / "validate_keda.mjs")], input=json.dumps(keda_docs),
                           capture_output=True, text=True)
        if r.returncode != 0:
            errors.append(f"KEDA validation: {r.stdout.strip()} {r.stderr.strip()}")
    for e in errors:
        print(f"INVALID {e}")
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    print(f"kubernetes {K8S_VERSION} + KEDA schemas: {summary}: "
          f"{'OK' if not errors else f'{len(errors)} error(s)'}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
