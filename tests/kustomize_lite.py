"""Renders a kustomization the way `kubectl kustomize` does, for the features deploy/k8s uses
(resources, configMapGenerator, generatorOptions, images, JSON 6902 patches). Anything else in a
kustomization is an error, so a new feature cannot slip past the tests unrendered."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {
    "apiVersion",
    "kind",
    "resources",
    "configMapGenerator",
    "generatorOptions",
    "images",
    "patches",
}


def render(folder: Path) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        raise ValueError(f"kustomize_lite does not render {sorted(unknown)}")
    docs = []
    for resource in kustomization.get("resources", []):
        docs += [d for d in yaml.safe_load_all((folder / resource).read_text()) if d]
    hashless = kustomization.get("generatorOptions", {}).get("disableNameSuffixHash", False)
    assert hashless, "name hashes would rename the ConfigMap the pods mount"
    for generator in kustomization.get("configMapGenerator", []):
        data = {}
        for entry in generator["files"]:
            key, _, source = entry.partition("=")
            data[key] = (folder / (source or key)).read_text()
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": generator["name"]},
                "data": data,
            }
        )
    for image in kustomization.get("images", []):
        for doc in docs:
            _retag(doc, image)
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        matched = [
            d
            for d in docs
            if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]
        ]
        assert matched, f"patch target {target} matches nothing"
        for doc in matched:
            for op in yaml.safe_load(patch["patch"]):
                _apply(doc, op)
    return docs


def _retag(node: Any, image: dict[str, str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str) and value.split(":")[0] == image["name"]:
                node[key] = f"{image.get('newName', image['name'])}:{image['newTag']}"
            else:
                _retag(value, image)
    elif isinstance(node, list):
        for item in node:
            _retag(item, image)


def _apply(doc: dict[str, Any], op: dict[str, Any]) -> None:
    """One JSON 6902 operation (replace or add) at a JSON pointer."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
    parent = doc
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    if op["op"] == "replace":
        if isinstance(parent, list):
            parent[int(last)]  # must exist
        elif last not in parent:
            raise KeyError(f"replace of missing {op['path']}")
    elif op["op"] != "add":
        raise ValueError(f"unsupported patch op {op['op']}")
    value = copy.deepcopy(op["value"])
    if isinstance(parent, list):
        parent[int(last)] = value
    else:
        parent[last] = value
