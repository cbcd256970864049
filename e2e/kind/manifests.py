"""Reading the repository's Kubernetes manifests: files, kustomize output, values in them."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

Doc = dict[str, Any]


def load_docs(text: str) -> list[Doc]:
    """Every non-empty YAML document; raises yaml.YAMLError on bad YAML."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def dump_docs(docs: Iterable[Doc]) -> str:
    return yaml.safe_dump_all(list(docs), sort_keys=False)


def kustomize(path: Path, kubectl: Callable[..., str]) -> list[Doc]:
    """``kubectl kustomize <path>`` parsed; ``kubectl(*args)`` returns the command's output."""
    return load_docs(kubectl("kustomize", str(path)))


def with_secret_value(docs: list[Doc], *, namespace: str, name: str, key: str, value: str) -> list[Doc]:
    """``docs`` with the Secret's ``key`` set to ``value`` (the Secret is added when missing)."""
    result = copy.deepcopy(docs)
    for doc in result:
        meta = doc.get("metadata") or {}
        if doc.get("kind") == "Secret" and meta.get("name") == name and meta.get("namespace", namespace) == namespace:
            (doc.get("data") or {}).pop(key, None)
            doc.setdefault("stringData", {})[key] = value
            return result
    result.append({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "stringData": {key: value},
    })
    return result


def pod_specs(doc: Doc) -> Iterator[Doc]:
    """Pod specs of workloads (Deployment, StatefulSet, Knative Service, ...)."""
    spec = (doc.get("spec") or {}).get("template", {}).get("spec")
    if isinstance(spec, dict):
        yield spec


def images(docs: Iterable[Doc]) -> set[str]:
    return {
        container["image"]
        for doc in docs
        for spec in pod_specs(doc)
        for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
        if "image" in container
    }


def find(docs: Iterable[Doc], kind: str, name: str) -> Doc | None:
    for doc in docs:
        if doc.get("kind") == kind and (doc.get("metadata") or {}).get("name") == name:
            return doc
    return None


def env_value(docs: list[Doc], workload: Doc, variable: str) -> str | None:
    """The value ``variable`` gets in ``workload``'s first container: literal, or from a ConfigMap in ``docs``."""
    for spec in pod_specs(workload):
        container = (spec.get("containers") or [{}])[0]
        for entry in container.get("env") or []:
            if entry.get("name") != variable:
                continue
            if "value" in entry:
                return str(entry["value"])
            ref = (entry.get("valueFrom") or {}).get("configMapKeyRef")
            if ref:
                return _config_map_data(docs, ref["name"]).get(ref["key"])
        for source in container.get("envFrom") or []:
            ref = source.get("configMapRef")
            if ref:
                data = _config_map_data(docs, ref["name"])
                if variable in data:
                    return str(data[variable])
    return None


def _config_map_data(docs: list[Doc], name: str) -> dict[str, str]:
    config_map = find(docs, "ConfigMap", name)
    return dict((config_map or {}).get("data") or {})
