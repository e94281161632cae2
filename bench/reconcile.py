"""Reconcile budget of the city operator, against a conventional Kopf operator as the baseline.

Runs alone: starts its own control plane (one LocalCluster), runs the operator under a
ServiceAccount of its own and counts that account's writes in the API server's audit log.

1. Writes per no-op reconcile (an annotation touched: a watch event, nothing to do) and per
   real change (spec.count changed: the ingestion Deployment must follow), for the city
   operator and for a baseline written the usual way (``on.create/update/resume`` handlers
   that apply the child and patch status every time, Kopf's progress annotations on).
2. Reconciles per second: 10,000 Incidents created while the operator is down, then the
   operator (its own process, the CLI) started and timed until every one has a status;
   HTTP 429 responses to the operator counted in the audit log.
3. Resident memory of that operator process with the 10,000 objects watched, against the
   same operator watching nothing.

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kopf
from citynerve.operators.city import rbac
from citynerve.operators.city.children import desired_ingest_deployment
from citynerve.operators.city.config import CityOptions
from citynerve.operators.city.handlers import build_registry
from citynerve.operators.localfed import toolchain
from citynerve.operators.localfed.cluster import LocalCluster
from citynerve.operators.runtime import (
    InProcessOperator,
    KubeTarget,
    OperatorOptions,
    new_registry,
    token_kubeconfig,
)
from kubernetes import client, config

ROOT = Path(__file__).resolve().parents[1]
GROUP, VERSION = "citynerve.io", "v1alpha1"
NAMESPACE = "bench"
TOUCHES = 10
CHANGES = 5
INCIDENTS = int(os.environ.get("BENCH_INCIDENTS", "10000"))
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}
log = logging.getLogger("bench")


def wait(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


class Audit:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def mark(self) -> None:
        self.offset = self.path.stat().st_size

    def writes(self, username: str) -> list[dict[str, Any]]:
        """The writes among ``username``'s requests (the audit log also records its reads)."""
        return [e for e in self.entries(username) if e.get("verb") in WRITE_VERBS]

    def entries(self, username: str) -> list[dict[str, Any]]:
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            lines = fh.read().splitlines()
        out = []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("user", {}).get("username") == username and entry.get("stage") == "ResponseComplete":
                out.append(entry)
        return out


def identity(
    api: client.ApiClient,
    cluster: LocalCluster,
    name: str,
    folder: Path,
    extra: list[dict[str, Any]] | None = None,
) -> tuple[Path, str]:
    """A ServiceAccount bound to the city operator's rules in the bench namespace, as a kubeconfig."""
    core, rbac_api = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(NAMESPACE, {"metadata": {"name": name}})
    rbac_api.create_namespaced_role(
        NAMESPACE, {"metadata": {"name": name}, "rules": [*rbac.role_rules(), *(extra or [])]}
    )
    rbac_api.create_namespaced_role_binding(
        NAMESPACE,
        {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}],
        },
    )
    token = core.create_namespaced_service_account_token(
        name, NAMESPACE, {"spec": {"expirationSeconds": 7200}}
    ).status.token
    path = token_kubeconfig(cluster.api_url, cluster.pki.ca_cert.read_bytes(), token, name, folder)
    return path, f"system:serviceaccount:{NAMESPACE}:{name}"


def baseline_registry(options: OperatorOptions, city: CityOptions) -> kopf.OperatorRegistry:
    """A conventional operator: change handlers that apply the child and patch status every time."""
    registry = new_registry(options)
    api = client.ApiClient(options.target.client_configuration())
    apps = client.AppsV1Api(api)

    @kopf.on.resume(GROUP, VERSION, "sensorfleets", registry=registry)
    @kopf.on.create(GROUP, VERSION, "sensorfleets", registry=registry)
    @kopf.on.update(GROUP, VERSION, "sensorfleets", registry=registry)
    def sensorfleet_apply(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        desired = desired_ingest_deployment(dict(body), city)
        name = desired["metadata"]["name"]
        try:
            apps.patch_namespaced_deployment(name, NAMESPACE, desired)
        except client.ApiException as exc:
            if exc.status != 404:
                raise
            apps.create_namespaced_deployment(NAMESPACE, desired)
        patch.status["observedGeneration"] = body.metadata.get("generation")

    return registry


def fleet_manifest(name: str, count: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "SensorFleet",
        "metadata": {"name": name},
        "spec": {
            "sensorType": "pipe-pressure-gauge",
            "district": "pudong",
            "count": count,
            "owner": "operator",
        },
    }


def write_budget(api: client.ApiClient, audit: Audit, username: str, fleet: str) -> dict[str, float]:
    """Writes per no-op reconcile and per real change made by ``username`` on one fleet."""
    custom = client.CustomObjectsApi(api)

    def observed() -> int | None:
        obj = custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "sensorfleets", fleet)
        return int((obj.get("status") or {}).get("observedGeneration") or 0)

    custom.create_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, "sensorfleets", fleet_manifest(fleet, 100)
    )
    wait(lambda: observed() == 1, 30, f"{fleet} reconciled")
    time.sleep(2)
    audit.mark()
    for i in range(TOUCHES):  # metadata only: a watch event with nothing to do
        custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            NAMESPACE,
            "sensorfleets",
            fleet,
            {"metadata": {"annotations": {"bench/touch": str(i)}}},
        )
        time.sleep(0.5)
    time.sleep(2)
    noop = len(audit.writes(username)) / TOUCHES
    audit.mark()
    for i in range(CHANGES):
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, "sensorfleets", fleet, {"spec": {"count": 200 + i}}
        )
        wait(lambda g=i + 2: observed() == g, 30, f"{fleet} generation {i + 2}")
        time.sleep(1)
    time.sleep(2)
    change = len(audit.writes(username)) / CHANGES
    return {"writes_per_noop_reconcile": noop, "writes_per_real_change": change}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_cli_operator(kubeconfig: Path, folder: Path) -> subprocess.Popen[bytes]:
    log_file = (folder / "operator.log").open("ab")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "citynerve.operators.cli",
            "operator",
            "city",
            "--kubeconfig",
            str(kubeconfig),
            "--context",
            "hub",
            "--namespace",
            NAMESPACE,
            "--resync-seconds",
            "3600",
            "--log-level",
            "WARNING",
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def incident(i: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Incident",
        "metadata": {"name": f"inc-{i:05d}"},
        "spec": {
            "scenarioRef": {"name": "bench"},
            "kind": "water-burst",
            "severity": "warning",
            "location": {"latitude": "31.2", "longitude": "121.4"},
            "detectedAt": "2026-07-12T04:15:00Z",
            "transitions": [{"state": "Detected", "time": "2026-07-12T04:15:00Z", "actor": "bench"}],
        },
    }


def reconciled_incidents(custom: client.CustomObjectsApi) -> int:
    done, token = 0, None
    while True:
        page = custom.list_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, "incidents", limit=2000, _continue=token
        )
        done += sum(1 for item in page["items"] if (item.get("status") or {}).get("conditions"))
        token = page["metadata"].get("continue")
        if not token:
            return done


def throughput_and_memory(
    api: client.ApiClient, audit: Audit, kubeconfig: Path, username: str, folder: Path
) -> dict[str, float]:
    custom = client.CustomObjectsApi(api)
    idle = start_cli_operator(kubeconfig, folder)
    time.sleep(15)
    idle_rss = rss_mb(idle.pid)
    stop(idle)
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda i: custom.create_namespaced_custom_object(
                    GROUP, VERSION, NAMESPACE, "incidents", incident(i)
                ),
                range(INCIDENTS),
            )
        )
    audit.mark()
    started = time.monotonic()
    proc = start_cli_operator(kubeconfig, folder)
    try:
        wait(lambda: reconciled_incidents(custom) >= INCIDENTS, 900, f"{INCIDENTS} incidents reconciled", 2.0)
        elapsed = time.monotonic() - started
        time.sleep(10)
        rss = rss_mb(proc.pid)
    finally:
        stop(proc)
    entries = audit.entries(username)
    throttled = sum(1 for e in entries if e.get("responseStatus", {}).get("code") == 429)
    return {
        "reconciles_per_second": round(INCIDENTS / elapsed, 1),
        "http_429": throttled,
        "api_requests_per_incident": round(len(entries) / INCIDENTS, 2),
        "watched_objects": INCIDENTS,
        "operator_rss_mb": round(rss, 1),
        "operator_rss_mb_idle_baseline": round(idle_rss, 1),
    }


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    toolchain.ensure(("etcd", "kubernetes", "kwok"))
    with tempfile.TemporaryDirectory(prefix="citynerve-bench-") as tmp:
        folder = Path(tmp)
        cluster = LocalCluster("bench", folder / "cluster")
        cluster.start()
        try:
            kubectl = [str(toolchain.binary("kubectl")), "--kubeconfig", str(cluster.kubeconfig)]
            subprocess.run(
                [*kubectl, "apply", "--server-side", "-f", str(ROOT / "crds")],
                check=True,
                capture_output=True,
            )
            wait(
                lambda: (
                    subprocess.run(
                        [*kubectl, "wait", "--for=condition=Established", "crd", "--all"],
                        capture_output=True,
                        check=False,
                    ).returncode
                    == 0
                ),
                60,
                "CRDs established",
            )
            api = config.new_client_from_config(str(cluster.kubeconfig), context="bench")
            client.CoreV1Api(api).create_namespace({"metadata": {"name": NAMESPACE}})
            wait(
                lambda: client.CoreV1Api(api).list_namespaced_service_account(NAMESPACE).items,
                30,
                "default ServiceAccount",
            )
            audit = Audit(cluster.audit_log)
            city = CityOptions(city="shanghai", resync_seconds=3600)
            results: dict[str, Any] = {}
            for label, build, account in (
                ("city_operator", build_registry, "city-operator"),
                ("baseline", baseline_registry, "baseline-operator"),
            ):
                # Kopf's progress annotations need what the city operator never does: patching the object.
                extra = [{"apiGroups": [GROUP], "resources": ["sensorfleets"], "verbs": ["patch"]}]
                kubeconfig, username = identity(
                    api, cluster, account, folder, extra if label == "baseline" else None
                )
                options = OperatorOptions(account, KubeTarget(kubeconfig, "hub"), namespaces=(NAMESPACE,))
                operator = InProcessOperator(options, build(options, city)).start()
                try:
                    results[label] = write_budget(api, audit, username, f"fleet-{label.replace('_', '-')}")
                finally:
                    operator.stop()
            kubeconfig, username = identity(api, cluster, "city-operator-cli", folder)
            results["city_operator"].update(throughput_and_memory(api, audit, kubeconfig, username, folder))
        finally:
            cluster.stop()
    figures = {
        "writes_per_noop_reconcile": results["city_operator"]["writes_per_noop_reconcile"],
        "writes_per_real_change": results["city_operator"]["writes_per_real_change"],
        "reconciles_per_second": results["city_operator"]["reconciles_per_second"],
        "http_429": results["city_operator"]["http_429"],
        "operator_rss_mb_10k_objects": results["city_operator"]["operator_rss_mb"],
        "targets": {
            "writes_per_noop_reconcile": 0,
            "writes_per_real_change": 2,
            "operator_rss_mb_10k_objects": 90,
        },
        "city_operator": results["city_operator"],
        "baseline": results["baseline"],
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
