"""Small, generic Kubernetes writes the operators share: ensure an object, apply a manifest.

Each function writes only when something differs, so a reconcile that finds everything in
place costs reads, never writes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from kubernetes import client, dynamic
from kubernetes.dynamic.exceptions import NotFoundError

log = logging.getLogger(__name__)

FIELD_MANAGER = "citynerve"


class Kube:
    """A dynamic client for one API server (discovery is cached for its lifetime)."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self.dynamic = dynamic.DynamicClient(api_client)

    def resource(self, api_version: str, kind: str) -> Any:
        return self.dynamic.resources.get(api_version=api_version, kind=kind)

    def get(self, api_version: str, kind: str, name: str,
            namespace: str | None = None) -> dict[str, Any] | None:
        try:
            obj = self.resource(api_version, kind).get(name=name, namespace=namespace)
        except NotFoundError:
            return None
        found: dict[str, Any] = obj.to_dict()
        return found

    def ensure(self, manifest: Mapping[str, Any]) -> bool:
        """Create ``manifest`` if absent; bring rules/spec/data in line if they drifted.

        Returns True if it wrote anything.
        """
        meta = manifest["metadata"]
        current = self.get(manifest["apiVersion"], manifest["kind"], meta["name"], meta.get("namespace"))
        res = self.resource(manifest["apiVersion"], manifest["kind"])
        if current is None:
            res.create(body=dict(manifest), namespace=meta.get("namespace"))
            return True
        drifted = {k: manifest[k] for k in ("rules", "roleRef", "subjects", "data")
                   if k in manifest and current.get(k) != manifest[k]}
        labels = meta.get("labels") or {}
        if any((current["metadata"].get("labels") or {}).get(k) != v for k, v in labels.items()):
            drifted["metadata"] = {"labels": labels}
        if not drifted:
            return False
        res.patch(body={"metadata": {"name": meta["name"]}, **drifted}, name=meta["name"],
                  namespace=meta.get("namespace"), content_type="application/merge-patch+json")
        return True

    def apply(self, manifest: Mapping[str, Any], field_manager: str = FIELD_MANAGER) -> dict[str, Any]:
        """Server-side apply: the manifest's fields become ours; others' fields are left alone."""
        meta = manifest["metadata"]
        res = self.resource(manifest["apiVersion"], manifest["kind"])
        applied = res.server_side_apply(body=dict(manifest), name=meta["name"],
                                        namespace=meta.get("namespace"),
                                        field_manager=field_manager, force_conflicts=True)
        result: dict[str, Any] = applied.to_dict()
        return result

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> bool:
        try:
            self.resource(api_version, kind).delete(name=name, namespace=namespace)
        except NotFoundError:
            return False
        return True
