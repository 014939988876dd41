"""A small Kustomize renderer for the tests: builds k8s/ without the kustomize binary.

It implements exactly the subset k8s/ uses and refuses anything else, so a kustomization that
grows a feature this file does not know fails the tests instead of rendering wrongly:

- ``resources`` (files, or directories holding a Kustomization) and ``components``
  (directories holding a Component, applied to what was accumulated so far);
- ``configMapGenerator`` (``files``, ``literals``, ``behavior`` create/replace/merge,
  ``options.labels``/``annotations``) with Kustomize's content-hash name suffix, and the name
  references to it in pod templates rewritten;
- ``patches``: strategic-merge patches (the merge keys of the lists k8s/ patches) and
  JSON 6902 patches (add, replace, remove), from ``path`` or inline ``patch``, with an optional
  ``target`` (group, version, kind, name, namespace); a target matching nothing is no error,
  as in Kustomize;
- ``namespace`` and ``images`` (``newName``, ``newTag``, ``digest``).

The order is Kustomize's: resources, components, generators, then patches, namespace, images;
the hash suffix and name references are settled once at the top, as ``kustomize build`` does.
When a ``kustomize`` or ``kubectl`` binary is present, the tests compare this renderer's output
with it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml

Resource = dict[str, Any]

KUSTOMIZATION_KEYS = {
    "apiVersion", "kind", "resources", "components", "configMapGenerator", "patches", "namespace", "images",
}
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
    "StorageClass", "PriorityClass", "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration",
}
# Strategic-merge keys of the lists the patches in k8s/ touch (from the Kubernetes API's
# x-kubernetes-patch-merge-key); any other list is replaced whole, as for a list without one.
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
    "volumeMounts": "mountPath", "ports": "containerPort", "imagePullSecrets": "name",
}
_HASHED = "__kustomize_hash__"  # marks a generated ConfigMap until the top-level build names it


class KustomizeError(Exception):
    pass


def build(path: str | Path) -> list[Resource]:
    """``kustomize build path``: the rendered resources (order not significant)."""
    resources = _accumulate(Path(path), "Kustomization", [])
    renames = {}
    for r in resources:
        if r["metadata"].pop(_HASHED, False):
            old = r["metadata"]["name"]
            new = f"{old}-{configmap_hash(r)}"
            r["metadata"]["name"] = new
            renames[(r["metadata"].get("namespace"), old)] = new
    for r in resources:
        for spec in _pod_specs(r):
            _rename_configmap_refs(spec, lambda name: renames.get((r["metadata"].get("namespace"), name), name))
    return resources


def configmap_hash(cm: Resource) -> str:
    """Kustomize's name suffix: sha256 of the JSON of kind, (empty) name and data, 10 hex
    characters with 0, 1, 3, a, e mapped to consonants."""
    doc: dict[str, Any] = {"kind": "ConfigMap", "name": "", "data": cm.get("data") or {}}
    if cm.get("binaryData"):
        doc["binaryData"] = cm["binaryData"]
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    text = text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")  # as Go's json.Marshal
    return hashlib.sha256(text.encode()).hexdigest()[:10].translate(str.maketrans("013ae", "ghkmt"))


def load_kustomization(directory: Path) -> dict[str, Any]:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        if (directory / name).is_file():
            k = yaml.safe_load((directory / name).read_text()) or {}
            unknown = set(k) - KUSTOMIZATION_KEYS
            if unknown:
                raise KustomizeError(f"{directory}: this renderer does not implement {sorted(unknown)}")
            return k
    raise KustomizeError(f"{directory}: no kustomization.yaml")


def _accumulate(directory: Path, expected_kind: str, resources: list[Resource]) -> list[Resource]:
    k = load_kustomization(directory)
    kind = k.get("kind", "Kustomization")
    if kind != expected_kind:
        raise KustomizeError(f"{directory}: expected a {expected_kind}, found a {kind}")
    want_api = "kustomize.config.k8s.io/v1alpha1" if kind == "Component" else "kustomize.config.k8s.io/v1beta1"
    if k.get("apiVersion", want_api) != want_api:
        raise KustomizeError(f"{directory}: {kind} must have apiVersion {want_api}")
    if kind == "Kustomization":
        resources = []
    for entry in k.get("resources") or []:
        target = (directory / entry).resolve()
        if target.is_dir():
            resources.extend(_accumulate(target, "Kustomization", []))
        else:
            resources.extend(load_file(target))
    for entry in k.get("components") or []:
        resources = _accumulate((directory / entry).resolve(), "Component", resources)
    for gen in k.get("configMapGenerator") or []:
        _generate_configmap(directory, gen, resources)
    for p in k.get("patches") or []:
        _apply_patch(directory, p, resources)
    if "namespace" in k:
        for r in resources:
            if r["kind"] not in CLUSTER_SCOPED:
                r["metadata"]["namespace"] = k["namespace"]
    for image in k.get("images") or []:
        _set_image(image, resources)
    _check_unique(directory, resources)
    return resources


def load_file(path: Path) -> list[Resource]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for d in docs:
        if not isinstance(d, dict) or not {"apiVersion", "kind", "metadata"} <= set(d):
            raise KustomizeError(f"{path}: not a Kubernetes resource: {str(d)[:80]}")
    return docs


def _check_unique(directory: Path, resources: list[Resource]) -> None:
    seen = set()
    for r in resources:
        key = (r["apiVersion"].split("/")[0] if "/" in r["apiVersion"] else "", r["kind"],
               r["metadata"].get("namespace"), r["metadata"]["name"])
        if key in seen:
            raise KustomizeError(f"{directory}: duplicate resource {key}")
        seen.add(key)


def _generate_configmap(directory: Path, gen: dict[str, Any], resources: list[Resource]) -> None:
    unknown = set(gen) - {"name", "files", "literals", "behavior", "options"}
    if unknown or set(gen.get("options") or {}) - {"labels", "annotations"}:
        raise KustomizeError(f"{directory}: configMapGenerator option not implemented: {gen}")
    data: dict[str, str] = {}
    for f in gen.get("files") or []:
        key, _, src = f.partition("=") if "=" in f else (Path(f).name, "", f)
        data[key] = (directory / src).read_text()
    for lit in gen.get("literals") or []:
        key, _, value = lit.partition("=")
        data[key] = value
    options = gen.get("options") or {}
    meta: dict[str, Any] = {"name": gen["name"], _HASHED: True}
    for field in ("labels", "annotations"):
        if options.get(field):
            meta[field] = dict(options[field])
    behavior = gen.get("behavior", "create")
    existing = [r for r in resources if r["kind"] == "ConfigMap" and r["metadata"]["name"] == gen["name"]]
    if behavior == "create":
        if existing:
            raise KustomizeError(f"{directory}: ConfigMap {gen['name']} exists; use behavior merge or replace")
        resources.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
        return
    if len(existing) != 1:
        raise KustomizeError(f"{directory}: behavior {behavior} needs exactly one ConfigMap {gen['name']}")
    cm = existing[0]
    if behavior == "replace":
        cm["data"] = data
    elif behavior == "merge":
        cm["data"] = {**(cm.get("data") or {}), **data}
    else:
        raise KustomizeError(f"{directory}: unknown behavior {behavior}")
    for field in ("labels", "annotations"):
        if meta.get(field):
            cm["metadata"][field] = {**cm["metadata"].get(field, {}), **meta[field]}


def _group_version(api_version: str) -> tuple[str, str]:
    return tuple(api_version.split("/", 1)) if "/" in api_version else ("", api_version)  # type: ignore[return-value]


def _matches(r: Resource, target: dict[str, Any]) -> bool:
    unknown = set(target) - {"group", "version", "kind", "name", "namespace"}
    if unknown:
        raise KustomizeError(f"patch target selector not implemented: {sorted(unknown)}")
    group, version = _group_version(r["apiVersion"])
    checks = {"group": group, "version": version, "kind": r["kind"], "name": r["metadata"]["name"],
              "namespace": r["metadata"].get("namespace") or ""}
    return all(re.fullmatch(str(want), checks[key]) for key, want in target.items())


def _apply_patch(directory: Path, p: dict[str, Any], resources: list[Resource]) -> None:
    if set(p) - {"path", "patch", "target"} or ("path" in p) == ("patch" in p):
        raise KustomizeError(f"{directory}: a patch needs exactly one of path or patch: {p}")
    text = (directory / p["path"]).read_text() if "path" in p else p["patch"]
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    if len(docs) == 1 and isinstance(docs[0], list):  # JSON 6902
        if "target" not in p:
            raise KustomizeError(f"{directory}: a JSON 6902 patch needs a target")
        for r in resources:
            if _matches(r, p["target"]):
                for op in docs[0]:
                    _json6902(r, op)
        return
    for patch in docs:  # strategic merge, each document naming its target unless one is given
        if "target" in p:
            targets = [r for r in resources if _matches(r, p["target"])]
        else:
            targets = [r for r in resources if r["kind"] == patch.get("kind")
                       and r["metadata"]["name"] == patch.get("metadata", {}).get("name")]
            if not targets:
                raise KustomizeError(f"{directory}: patch target {patch.get('kind')}/{patch.get('metadata')} not found")
        for r in targets:
            body = copy.deepcopy(patch)
            body.pop("apiVersion", None)
            body.pop("kind", None)
            body["metadata"] = {k: v for k, v in (body.get("metadata") or {}).items() if k not in ("name", "namespace")}
            _strategic_merge(r, body)


def _strategic_merge(base: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            _strategic_merge(base[key], value)
        elif isinstance(value, list) and isinstance(base.get(key), list) and key in MERGE_KEYS:
            merge_key = MERGE_KEYS[key]
            for item in value:
                match = [b for b in base[key] if isinstance(b, dict) and b.get(merge_key) == item.get(merge_key)]
                if match:
                    _strategic_merge(match[0], item)
                else:
                    base[key].append(copy.deepcopy(item))
        else:
            base[key] = copy.deepcopy(value)


def _json6902(r: Resource, op: dict[str, Any]) -> None:
    parts = [s.replace("~1", "/").replace("~0", "~") for s in op["path"].lstrip("/").split("/")]
    parent: Any = r
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    kind = op["op"]
    if kind not in ("add", "replace", "remove"):
        raise KustomizeError(f"JSON 6902 op not implemented: {kind}")
    if isinstance(parent, list):
        if kind == "add":
            parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(op["value"]))
        elif kind == "replace":
            parent[int(last)] = copy.deepcopy(op["value"])
        else:
            del parent[int(last)]
        return
    if kind in ("replace", "remove") and last not in parent:
        raise KustomizeError(f"JSON 6902 {kind}: {op['path']} does not exist in {r['kind']}/{r['metadata']['name']}")
    if kind == "remove":
        del parent[last]
    else:
        parent[last] = copy.deepcopy(op["value"])


def _pod_specs(r: Resource) -> list[dict[str, Any]]:
    if r["kind"] == "Pod":
        return [r["spec"]]
    if r["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return [r["spec"]["template"]["spec"]]
    if r["kind"] == "CronJob":
        return [r["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    return []


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _rename_configmap_refs(spec: dict[str, Any], rename: Any) -> None:
    for v in spec.get("volumes", []):
        if "configMap" in v:
            v["configMap"]["name"] = rename(v["configMap"]["name"])
        for src in v.get("projected", {}).get("sources", []):
            if "configMap" in src:
                src["configMap"]["name"] = rename(src["configMap"]["name"])
    for c in _containers(spec):
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("configMapKeyRef")
            if ref:
                ref["name"] = rename(ref["name"])
        for e in c.get("envFrom", []):
            if "configMapRef" in e:
                e["configMapRef"]["name"] = rename(e["configMapRef"]["name"])


_IMAGE = re.compile(r"^(?P<name>[^@]+?)(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>\S+))?$")


def _set_image(image: dict[str, Any], resources: list[Resource]) -> None:
    if set(image) - {"name", "newName", "newTag", "digest"}:
        raise KustomizeError(f"images option not implemented: {image}")
    for r in resources:
        for spec in _pod_specs(r):
            for c in _containers(spec):
                m = _IMAGE.match(c["image"])
                if not m or m["name"] != image["name"]:
                    continue
                name = image.get("newName", m["name"])
                if "digest" in image:
                    c["image"] = f"{name}@{image['digest']}"
                elif "newTag" in image:
                    c["image"] = f"{name}:{image['newTag']}"
                else:
                    c["image"] = name + (f":{m['tag']}" if m["tag"] else "") + (f"@{m['digest']}" if m["digest"] else "")
