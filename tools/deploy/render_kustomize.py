"""A minimal kustomize for deploy/k8s, used by scripts/validate-deploy.sh when kubectl (which has
kustomize built in) is not installed. It covers what the manifests here use: `resources` (files and
bases), `namespace`, `labels` (metadata only), `images`, and `patches` merged the strategic way (maps
merge; lists of named objects merge by `name`; other lists are replaced, as for custom resources).
When kubectl is present the script renders with both and requires the same objects.

    python tools/deploy/render_kustomize.py deploy/k8s/overlays/gpu > gpu.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

CLUSTER_SCOPED = {"Namespace"}


def merge(base, patch):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = merge(base[k], v) if k in base else v
        return out
    if (isinstance(base, list) and isinstance(patch, list) and base and patch
            and all(isinstance(x, dict) and "name" in x for x in base + patch)):
        out = [dict(x) for x in base]
        new = []
        for p in patch:
            for i, b in enumerate(out):
                if b["name"] == p["name"]:
                    out[i] = merge(b, p)
                    break
            else:
                new.append(p)
        return new + out  # kustomize puts items only the patch has first
    return patch


def key(doc):
    return (doc["kind"], doc["metadata"]["name"])


def render(folder: Path) -> list[dict]:
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for r in k.get("resources", []):
        p = folder / r
        docs += render(p) if p.is_dir() else [d for d in yaml.safe_load_all(p.read_text()) if d]
    for patch in k.get("patches", []):
        for pd in yaml.safe_load_all((folder / patch["path"]).read_text()):
            for i, d in enumerate(docs):
                if key(d) == key(pd):
                    docs[i] = merge(d, pd)
    for d in docs:
        md = d.setdefault("metadata", {})
        if "namespace" in k and d["kind"] not in CLUSTER_SCOPED:
            md["namespace"] = k["namespace"]
        for lab in k.get("labels", []):
            md.setdefault("labels", {}).update(lab.get("pairs", {}))
        spec = d.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            for img in k.get("images", []):
                if c.get("image", "").split(":")[0] in (img["name"],):
                    c["image"] = f"{img.get('newName', img['name'])}:{img['newTag']}"
    return docs


if __name__ == "__main__":
    yaml.safe_dump_all(render(Path(sys.argv[1])), sys.stdout, sort_keys=True)
