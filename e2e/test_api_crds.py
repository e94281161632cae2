"""The generated CRDs on real API servers: samples accepted, bad YAML refused naming the field,
every field explained, printer columns useful."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from citynerve.operators.api import KIND_BY_NAME, KINDS

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
CRD_DIR = REPO / "crds"
SAMPLES = REPO / "samples"
INVALID = Path(__file__).with_name("invalid")
HUB, CITY = "hub", "shanghai"


def _cluster_for(kind: str) -> str:
    return HUB if KIND_BY_NAME[kind].cluster == "hub" else CITY


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _dump(docs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


@pytest.fixture(scope="module")
def crds(federation: Any) -> Any:
    """All CityNerve CRDs installed and Established in every cluster (a city may run hub kinds too)."""
    for cluster in federation.names:
        # Server-side apply: the CRDs are too large for the last-applied annotation.
        federation.kubectl(cluster, "apply", "--server-side", "--force-conflicts", "-f", str(CRD_DIR))
    for cluster in federation.names:
        federation.kubectl(
            cluster,
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            *(f"crd/{info.crd_name}" for info in KINDS),
            timeout=90,
        )
    return federation


@pytest.mark.timeout(120)
def test_crds_are_established_in_every_cluster(crds: Any) -> None:
    for cluster in crds.names:
        out = crds.kubectl(
            cluster,
            "get",
            "crd",
            "-l",
            "app.kubernetes.io/part-of=citynerve",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ).stdout.split()
        assert sorted(out) == sorted(info.crd_name for info in KINDS), cluster


def _renamed_cluster_scoped(docs: list[dict[str, Any]], suffix: str) -> list[dict[str, Any]]:
    """Cluster-scoped objects get a per-test name so tests sharing a cluster never collide."""
    renamed = []
    for doc in docs:
        if KIND_BY_NAME[doc["kind"]].scope == "Cluster":
            metadata = {**doc["metadata"], "name": f"{doc['metadata']['name']}-{suffix}"}
            renamed.append({**doc, "metadata": metadata})
        else:
            renamed.append(doc)
    return renamed


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cluster", [HUB, CITY])
def test_every_sample_is_accepted(crds: Any, namespace: str, cluster: str) -> None:
    folders = {HUB: ["hub", "sensortypes"], CITY: ["city"]}[cluster]
    docs = [
        doc
        for folder in folders
        for path in sorted((SAMPLES / folder).glob("*.yaml"))
        for doc in _documents(path)
    ]
    assert docs
    manifest = _dump(_renamed_cluster_scoped(docs, namespace))
    crds.kubectl(cluster, "apply", "--dry-run=server", "-n", namespace, "-f", "-", input=manifest)
    try:
        out = crds.kubectl(cluster, "create", "-n", namespace, "-f", "-", "-o", "name", input=manifest).stdout
        assert len(out.split()) == len(docs)
    finally:
        cluster_scoped = [
            d for d in _renamed_cluster_scoped(docs, namespace) if KIND_BY_NAME[d["kind"]].scope == "Cluster"
        ]
        if cluster_scoped:
            crds.kubectl(
                cluster,
                "delete",
                "--ignore-not-found",
                "--wait=false",
                "-f",
                "-",
                input=_dump(cluster_scoped),
            )


@dataclass(frozen=True)
class InvalidCase:
    path: Path
    expect: str
    docs: list[dict[str, Any]]

    @property
    def kind(self) -> str:
        return str(self.docs[0]["kind"])


def _invalid_cases() -> list[InvalidCase]:
    cases = []
    for path in sorted(INVALID.glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        match = re.search(r"^# expect: (.+)$", text, re.MULTILINE)
        assert match, f"{path.name}: no `# expect:` header"
        cases.append(InvalidCase(path, match.group(1).strip(), _documents(path)))
    return cases


def _refusal(crds: Any, namespace: str, case: InvalidCase) -> tuple[int, str]:
    cluster = _cluster_for(case.kind)
    docs = _renamed_cluster_scoped(case.docs, namespace)
    if len(docs) == 1:
        proc = crds.kubectl(
            cluster, "create", "--dry-run=server", "-n", namespace, "-f", "-", input=_dump(docs), check=False
        )
        return proc.returncode, proc.stderr
    original, update = docs
    crds.kubectl(cluster, "create", "-n", namespace, "-f", "-", input=_dump([original]))
    try:
        proc = crds.kubectl(
            cluster, "replace", "-n", namespace, "-f", "-", input=_dump([update]), check=False
        )
    finally:
        crds.kubectl(cluster, "delete", "-n", namespace, "--wait=false", "-f", "-", input=_dump([original]))
    return proc.returncode, proc.stderr


@pytest.mark.timeout(150)
def test_every_invalid_manifest_is_refused_naming_the_field(crds: Any, namespace: str) -> None:
    cases = _invalid_cases()
    assert len(cases) >= 40
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda case: _refusal(crds, namespace, case), cases))
    failures = []
    for case, (returncode, stderr) in zip(cases, results, strict=True):
        if returncode == 0:
            failures.append(f"{case.path.name}: accepted, expected refusal with {case.expect!r}")
        elif case.expect not in stderr:
            failures.append(f"{case.path.name}: expected {case.expect!r} in: {stderr.strip()}")
    assert not failures, "\n".join(failures)


def _walk_undescribed(schema: dict[str, Any], path: str) -> Iterator[str]:
    for name, child in schema.get("properties", {}).items():
        child_path = f"{path}.{name}"
        if not child.get("description"):
            yield child_path
        yield from _walk_undescribed(child, child_path)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from _walk_undescribed(schema[key], f"{path}[*]")


@pytest.mark.timeout(120)
def test_served_openapi_describes_every_field(crds: Any, wait_for: Any) -> None:
    def served() -> dict[str, Any] | None:
        proc = crds.kubectl(HUB, "get", "--raw", "/openapi/v3/apis/citynerve.io/v1alpha1", check=False)
        if proc.returncode != 0:
            return None
        schemas: dict[str, Any] = json.loads(proc.stdout)["components"]["schemas"]
        wanted = {f"io.citynerve.v1alpha1.{info.kind}" for info in KINDS}
        return schemas if wanted <= set(schemas) else None

    schemas = wait_for(served, 60, what="the CityNerve kinds in the served OpenAPI v3 document")
    for info in KINDS:
        schema = schemas[f"io.citynerve.v1alpha1.{info.kind}"]
        assert schema.get("description"), info.kind
        for field in ("spec", "status"):
            assert schema["properties"][field].get("description"), f"{info.kind}.{field}"
            undescribed = list(_walk_undescribed(schema["properties"][field], f"{info.kind}.{field}"))
            assert not undescribed, undescribed


@pytest.mark.timeout(120)
def test_kubectl_explain_teaches(crds: Any) -> None:
    def explain(*args: str) -> str:
        # kubectl wraps descriptions; compare on single-spaced text.
        return " ".join(crds.kubectl(CITY, "explain", *args).stdout.split())

    recursive = explain("scenario.spec", "--recursive")
    for field in ("thresholds", "warning", "alarm", "alertRoutes", "secretRef", "simulation", "replicas"):
        assert field in recursive
    thresholds = explain("scenario.spec.thresholds")
    assert "Warning and alarm levels" in thresholds
    assert "Must be below" in thresholds
    assert "alarm" in explain("scenarios.spec.thresholds.warning")
    for info in KINDS:
        out = explain(f"{info.plural}.spec")
        assert "DESCRIPTION" in out
        assert (info.spec_model.__doc__ or "").split()[0] in out, info.kind
    assert "UN/CEFACT" in explain("sensortype.spec.properties.unitCode")
    assert "exactly one" in explain("modelpromotion.spec.source.version")


@pytest.mark.timeout(120)
def test_printer_columns_show_health_at_a_glance(crds: Any, namespace: str) -> None:
    city = _renamed_cluster_scoped(_documents(SAMPLES / "hub" / "city-shanghai.yaml"), namespace)[0]
    name = city["metadata"]["name"]
    crds.kubectl(HUB, "create", "-f", "-", input=_dump([city]))
    try:
        status = {
            "status": {
                "observedGeneration": 1,
                "conditions": [
                    {
                        "type": t,
                        "status": "True",
                        "reason": "AgentHeartbeat",
                        "message": "ok",
                        "lastTransitionTime": "2026-07-12T04:00:00Z",
                    }
                    for t in ("Joined", "Reachable", "Ready")
                ],
                "lastHeartbeat": "2026-07-12T04:00:00Z",
                "sensorsOnline": [{"sensorType": "pipe-pressure-gauge", "count": 4187}],
                "sensorsOnlineTotal": 4187,
                "activeScenarios": 4,
                "openIncidents": 1,
            }
        }
        crds.kubectl(
            HUB, "patch", "city", name, "--subresource=status", "--type=merge", "-p", json.dumps(status)
        )
        table = crds.kubectl(HUB, "get", "cities", name).stdout.splitlines()
        header = table[0].split()
        for column in (
            "NAME",
            "REGION",
            "REACHABLE",
            "READY",
            "SENSORS",
            "ONLINE",
            "OPEN",
            "INCIDENTS",
            "AGE",
        ):
            assert column in header, table
        row = table[1].split()
        assert row[:2] == [name, "east"]
        assert "True" in row
        assert "4187" in row
        wide = crds.kubectl(HUB, "get", "cities", name, "-o", "wide").stdout.splitlines()[0]
        assert "JOINED" in wide
        assert "LAST HEARTBEAT" in wide
    finally:
        crds.kubectl(HUB, "delete", "city", name, "--wait=false")

    crds.kubectl(CITY, "create", "-n", namespace, "-f", str(SAMPLES / "city"))
    for resource, columns in {
        "sensorfleets": ("TYPE", "DISTRICT", "COUNT", "ONLINE", "FRESHNESS", "QUALITY", "READY", "AGE"),
        "scenarios": ("KIND", "MODE", "READY", "OPEN INCIDENTS", "AGE"),
        "incidents": ("SCENARIO", "KIND", "SEVERITY", "STATE", "DETECTED", "RESPONSE", "AGE"),
        "analyticsmodels": ("MODEL", "ALIAS", "VERSION", "READY", "AGE"),
    }.items():
        header = crds.kubectl(CITY, "get", resource, "-n", namespace).stdout.splitlines()[0]
        for column in columns:
            assert column in header, (resource, header)
    incident = crds.kubectl(CITY, "get", "inc", "-n", namespace).stdout
    assert "OnSite" in incident
    assert "alarm" in incident
    everything = crds.kubectl(CITY, "get", "citynerve", "-n", namespace, "-o", "name").stdout.split()
    assert any(n.startswith("scenario.citynerve.io/") for n in everything)
    assert any(n.startswith("sensorfleet.citynerve.io/") for n in everything)
    assert any(n.startswith("incident.citynerve.io/") for n in everything)
