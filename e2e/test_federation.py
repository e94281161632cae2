"""The local federation is made of real, independent Kubernetes control planes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from citynerve.operators.localfed import toolchain
from kubernetes import client, watch

pytestmark = pytest.mark.e2e

WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.harness.citynerve.io"},
    "spec": {
        "group": "harness.citynerve.io",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [{
            "name": "v1", "served": True, "storage": True,
            "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                "spec": {"type": "object", "properties": {"size": {"type": "integer"}}}}}},
        }],
    },
}


def _apply_crd(api_client: client.ApiClient) -> None:
    ext = client.ApiextensionsV1Api(api_client)
    try:
        ext.create_custom_resource_definition(WIDGET_CRD)
    except client.ApiException as exc:
        if exc.status != 409:
            raise


def _established(api_client: client.ApiClient) -> bool:
    crd = client.ApiextensionsV1Api(api_client).read_custom_resource_definition(
        WIDGET_CRD["metadata"]["name"])  # type: ignore[index]
    return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])


@pytest.mark.timeout(120)
def test_each_cluster_serves_crds_and_watches(federation: Any, namespace: str, wait_for: Any) -> None:
    for name in federation.names:
        api_client = federation.api_client(name)
        version = client.VersionApi(api_client).get_code()
        assert version.git_version == toolchain.KUBERNETES_VERSION, name

        _apply_crd(api_client)
        wait_for(lambda c=api_client: _established(c), 30, what=f"Widget CRD Established on {name}")
        custom = client.CustomObjectsApi(api_client)
        wait_for(lambda c=custom, n=name: _try_create(c, namespace, n), 20,
                 what=f"a Widget created on {name}")

        events = watch.Watch().stream(custom.list_namespaced_custom_object, "harness.citynerve.io", "v1",
                                      namespace, "widgets", timeout_seconds=10)
        seen = next(e for e in events if e["object"]["metadata"]["name"] == f"w-{name}")
        assert seen["type"] == "ADDED"
        assert seen["object"]["spec"]["size"] == 3


def _try_create(custom: client.CustomObjectsApi, namespace: str, cluster: str) -> bool:
    body = {"apiVersion": "harness.citynerve.io/v1", "kind": "Widget",
            "metadata": {"name": f"w-{cluster}"}, "spec": {"size": 3}}
    try:
        custom.create_namespaced_custom_object("harness.citynerve.io", "v1", namespace, "widgets", body)
    except client.ApiException as exc:
        if exc.status == 404:  # the new resource is not served yet
            return False
        raise
    return True


@pytest.mark.timeout(240)
def test_deployment_becomes_available_on_kwok_nodes(federation: Any, namespace: str,
                                                    wait_for: Any) -> None:
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "echo"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "echo"}},
                 "template": {"metadata": {"labels": {"app": "echo"}},
                              "spec": {"containers": [{"name": "echo", "image": "registry.local/echo:1"}]}}},
    }
    for name in federation.names:
        apps = client.AppsV1Api(federation.api_client(name))
        apps.create_namespaced_deployment(namespace, deployment)

    def available(cluster: str) -> bool:
        dep = client.AppsV1Api(federation.api_client(cluster)).read_namespaced_deployment("echo", namespace)
        return (dep.status.available_replicas or 0) == 2

    for name in federation.names:
        wait_for(lambda n=name: available(n), 100, what=f"Deployment echo Available on {name}")
        pods = client.CoreV1Api(federation.api_client(name)).list_namespaced_pod(namespace).items
        assert {p.spec.node_name for p in pods} == {"kwok-node-0"}
        assert all(p.status.phase == "Running" for p in pods)


@pytest.mark.timeout(120)
def test_namespace_deletion_completes(federation: Any, wait_for: Any) -> None:
    for name in federation.names:
        core = client.CoreV1Api(federation.api_client(name))
        core.create_namespace({"metadata": {"name": "doomed"}})
        core.create_namespaced_config_map("doomed", {"metadata": {"name": "m"}, "data": {"k": "v"}})
        core.delete_namespace("doomed")

    def gone(cluster: str) -> bool:
        try:
            client.CoreV1Api(federation.api_client(cluster)).read_namespace("doomed")
        except client.ApiException as exc:
            return exc.status == 404
        return False

    for name in federation.names:
        wait_for(lambda n=name: gone(n), 60, what=f"namespace doomed deleted on {name}")


@pytest.mark.timeout(60)
def test_rbac_refuses_a_service_account_without_bindings(federation: Any, namespace: str,
                                                         wait_for: Any) -> None:
    for name in federation.names:
        core = client.CoreV1Api(federation.api_client(name))
        core.create_namespaced_service_account(namespace, {"metadata": {"name": "nobody"}})
        token = core.create_namespaced_service_account_token(
            "nobody", namespace, {"spec": {"expirationSeconds": 600}}).status.token

        as_nobody = client.Configuration()
        as_nobody.host = federation.cluster(name).api_url
        as_nobody.ssl_ca_cert = str(federation.cluster(name).pki.ca_cert)
        as_nobody.api_key = {"authorization": f"Bearer {token}"}
        nobody = client.CoreV1Api(client.ApiClient(as_nobody))
        with pytest.raises(client.ApiException) as refused:
            nobody.list_namespaced_secret(namespace)
        assert refused.value.status == 403
        reason = json.loads(refused.value.body)["message"]
        assert f"system:serviceaccount:{namespace}:nobody" in reason
        # The token authenticated (a 401 would not name the user): the refusal is RBAC's.
        assert 'cannot list resource "secrets"' in reason


@pytest.mark.timeout(150)
def test_a_stopped_city_does_not_disturb_the_others_and_keeps_its_data(
        federation: Any, namespace: str, wait_for: Any) -> None:
    city = federation.cluster("chengdu")
    core = client.CoreV1Api(federation.api_client("chengdu"))
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "before"}, "data": {"k": "kept"}})

    city.stop_component("kube-apiserver")
    try:
        with pytest.raises(Exception):  # noqa: B017, PT011 - any connection error will do
            core.list_namespaced_config_map(namespace, _request_timeout=3)
        for other in ("hub", "shanghai"):
            other_core = client.CoreV1Api(federation.api_client(other))
            other_core.create_namespaced_config_map(
                namespace, {"metadata": {"name": "during"}, "data": {"k": other}})
            assert other_core.read_namespaced_config_map("during", namespace).data == {"k": other}
    finally:
        city.start_component("kube-apiserver")

    kept = wait_for(lambda: _read_or_none(core, namespace, "before"), 30, what="chengdu answering again")
    assert kept.data == {"k": "kept"}


def _read_or_none(core: client.CoreV1Api, namespace: str, name: str) -> Any:
    try:
        return core.read_namespaced_config_map(name, namespace, _request_timeout=3)
    except Exception:  # noqa: BLE001 - connection refused while the server starts
        return None
