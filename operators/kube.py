"""Small, generic Kubernetes writes the operators share: ensure an object, apply a manifest.

Each function writes only when something differs, so a reconcile that finds everything in
place costs reads, never writes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
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


class KubeRest:
    """JSON requests by path through an ``ApiClient`` (its authentication, TLS and connection pool).

    For an operator that must stay small: the typed API classes cost tens of megabytes each
    once instantiated (``CoreV1Api`` ≈ 60 MB, ``AppsV1Api`` ≈ 17 MB: a validator for every
    method), and a reconciler that reads and writes a handful of kinds as dicts needs none of
    that. Errors are the client's ``ApiException`` (``.status``, ``.reason``, ``.body``).
    """

    def __init__(self, api_client: client.ApiClient, timeout: float | None = None) -> None:
        self.api_client = api_client
        self.timeout = timeout

    def request(self, method: str, path: str, *, query: Mapping[str, Any] | None = None,
                body: Any = None, content_type: str = "application/json") -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        params = [(k, v) for k, v in (query or {}).items() if v is not None] or None
        _, url, headers, body, _ = self.api_client.param_serialize(
            method, path, query_params=params, header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        response = self.api_client.call_api(method, url, header_params=headers, body=body,
                                            _request_timeout=self.timeout)
        response.read()
        if not 200 <= response.status <= 299:
            raise client.ApiException(http_resp=response)
        result: dict[str, Any] = json.loads(response.data) if response.data else {}
        return result

    def get(self, path: str) -> dict[str, Any] | None:
        """The object at ``path``, or None if there is none."""
        try:
            return self.request("GET", path)
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, path: str, *, page: int = 500, **query: Any) -> Iterator[dict[str, Any]]:
        """Every item at ``path``, in pages of ``page`` so a large kind is never one huge response."""
        token: str | None = None
        while True:
            result = self.request("GET", path, query={**query, "limit": page, "continue": token})
            yield from result.get("items") or []
            token = (result.get("metadata") or {}).get("continue")
            if not token:
                return

    def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("POST", path, body=dict(body))

    def replace(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("PUT", path, body=dict(body))

    def merge_patch(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", path, body=dict(patch), content_type="application/merge-patch+json")

    def delete(self, path: str) -> bool:
        """Delete the object at ``path``; False if it was already gone."""
        try:
            self.request("DELETE", path)
        except client.ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True


def object_path(api_version: str, plural: str, namespace: str | None = None, name: str | None = None,
                subresource: str | None = None) -> str:
    """The REST path of a kind (``plural``), one object, or one of its subresources."""
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    parts = [base, *(["namespaces", namespace] if namespace else []), plural, *([name] if name else []),
             *([subresource] if subresource else [])]
    return "/".join(parts)
