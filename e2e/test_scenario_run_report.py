"""The report's figures equal what the API and MLflow hold for the same run.

A real urban-flood drill's job (``citynerve.operators.city.job.run_job``, what a local Ray actor and a
RayJob run) against Shanghai's API server and a real MLflow server: it creates Incidents naming
its MLflow run and records what it scored. The duty officer's report is built from them the way
the demo builds it, and every figure on the page is checked against the API and MLflow directly.
"""

from __future__ import annotations

import html
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from citynerve.models.registry import registry_client
from citynerve.models.scenario_runs import SERIES_ARTIFACT, experiment_name, read_scenario_run
from citynerve.operators.city.children import scenario_payload, workload_revision
from citynerve.operators.city.config import ANNOTATION_MLFLOW_RUN
from citynerve.operators.city.job import run_job
from citynerve.operators.demo.report import DemoResult, build_page, incident_record, runs_named_by
from citynerve.operators.federation.embedded import install_crds
from citynerve.operators.runtime import KubeTarget
from kubernetes import client

pytestmark = pytest.mark.e2e
CITY = "shanghai"
ROOT = Path(__file__).resolve().parents[1]
GROUP, VERSION = "citynerve.io", "v1alpha1"
FLEETS = ("underpass-water-level", "rain-gauges")


def _install_crds(federation: Any) -> None:
    install_crds(KubeTarget(federation.kubeconfig, CITY))


def _create(
    custom: client.CustomObjectsApi, namespace: str, plural: str, body: dict[str, Any]
) -> dict[str, Any]:
    created: dict[str, Any] = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body)
    return created


def _typhoon_drill(
    federation: Any, namespace: str, name: str
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The sample urban-flood Scenario as the demo's typhoon drill, and its fleets, created in Shanghai."""
    _install_crds(federation)
    custom = client.CustomObjectsApi(federation.api_client(CITY))
    fleets = {}
    for doc in yaml.safe_load_all((ROOT / "samples" / "city" / "sensorfleets.yaml").read_text()):
        if doc and doc["metadata"]["name"] in FLEETS:
            fleets[doc["metadata"]["name"]] = _create(custom, namespace, "sensorfleets", doc)
    scenario = yaml.safe_load((ROOT / "samples" / "city" / "scenario-urban-flood.yaml").read_text())
    scenario["metadata"]["name"] = name
    scenario["spec"].update(
        mode="drill",
        models=[],
        alertRoutes=[],
        simulation={"engine": "swmm", "network": "example-catchment", "event": "storm:typhoon"},
    )
    return _create(custom, namespace, "scenarios", scenario), fleets


def _cells(page: str, incident: str) -> list[str]:
    row = page.split(f'<tr data-name="{incident}">')[1].split("</tr>", maxsplit=1)[0]
    return re.findall(r"<td[^>]*>(.*?)</td>", row)


@pytest.mark.timeout(600)
def test_the_reports_figures_equal_what_the_api_and_mlflow_hold(
    federation: Any, mlflow_server: Any, namespace: str
) -> None:
    custom = client.CustomObjectsApi(federation.api_client(CITY))
    scenario, fleets = _typhoon_drill(federation, namespace, "typhoon-underpass-drill")
    payload = scenario_payload(scenario, fleets, {}, CITY, mlflow_server.url)

    writer = run_job(payload, KubeTarget(federation.kubeconfig, CITY))

    # What the API holds: the Incidents, each naming the run that recorded it.
    incidents = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "incidents")["items"]
    assert len(incidents) == writer.created > 0
    run_ids = runs_named_by(incidents)
    assert len(run_ids) == 1
    run_id = run_ids[0]
    assert all(i["metadata"]["annotations"][ANNOTATION_MLFLOW_RUN] == run_id for i in incidents)

    # What MLflow holds, read with MLflow's own client.
    mlflow = registry_client(mlflow_server.url)
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert mlflow.get_experiment(run.info.experiment_id).name == experiment_name(CITY)
    assert run.data.params["scenario"] == "typhoon-underpass-drill"
    assert run.data.params["namespace"] == namespace
    assert run.data.params["revision"] == workload_revision(payload)
    assert run.data.metrics["incidents"] == run.data.metrics["incidentsCreated"] == len(incidents)
    with tempfile.TemporaryDirectory() as tmp:
        series = json.loads(Path(mlflow.download_artifacts(run_id, SERIES_ARTIFACT, tmp)).read_text())

    # The report, built as the demo builds it.
    runs = {r: read_scenario_run(mlflow_server.url, r) for r in run_ids}
    records = [incident_record(CITY, i, runs) for i in incidents]
    page = build_page(DemoResult(incidents=records, runs=runs, mlflow_url=mlflow_server.url))

    link = f"{mlflow_server.url}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    headers = re.findall(r'<th scope="col"><button type="button">([^<]+)</button></th>', page)
    column = {name: n for n, name in enumerate(headers)}
    onsets = {t["id"]: t["marks"].get("floodOnset") for t in series["traces"]}
    for incident in incidents:
        spec = incident["spec"]
        cells = _cells(page, incident["metadata"]["name"])
        assert html.unescape(cells[column["Severity"]]) == spec["severity"]
        assert spec["detectedAt"] in cells[column["Detected (UTC)"]]
        assert html.unescape(cells[column["Asset"]]) == spec["location"]["assetId"]
        assert f'href="{html.escape(link)}"' in cells[column["MLflow run"]]
        minute = next(float(e["value"]) for e in spec["evidence"] if e["metric"] == "simulatedMinute")
        assert cells[column["Simulated time"]] == f"{minute:.0f} min"
        onset = onsets.get(spec["location"]["assetId"])
        if onset is None:
            assert cells[column["Lead time"]] == "-"
            assert cells[column["Node"]] in ("did not flood", "-")
        else:
            assert cells[column["Lead time"]] == f"{onset / 60 - minute:.0f} min"
            assert cells[column["Node"]] == "flooded"
    assert any(onset is not None for onset in onsets.values()), "the typhoon floods at least one node"

    # The flood plot: a node that flooded, in the Scenario's unit (mm), against its thresholds.
    data = json.loads(re.search(r'<script type="application/json" id="data-flood">(.*?)</script>', page)[1])
    trace = next(t for t in series["traces"] if t["id"] == data["node"])
    assert data["run"] == run_id
    assert data["floodOnsetH"] == trace["marks"]["floodOnset"] / 3600
    assert data["values"] == [None if v is None else round(v * 1000, 6) for v in trace["values"]]
    assert data["timesH"] == [t / 3600 for t in series["timesS"]]
    level = next(t for t in scenario["spec"]["thresholds"] if t["metric"] == "waterLevelMm")
    assert data["unit"] == "mm"
    assert data["thresholds"] == [level["warning"], level["alarm"]]
    warned = next((i for i in incidents if i["spec"]["location"]["assetId"] == data["node"]), None)
    if warned is not None:
        minute = next(
            float(e["value"]) for e in warned["spec"]["evidence"] if e["metric"] == "simulatedMinute"
        )
        assert data["warnedH"] == minute / 60
    # The run's metrics as the page lists them.
    metrics = re.search(r'<table id="runs">.*?</table>', page, re.DOTALL)
    assert metrics is not None
    for key, value in run.data.metrics.items():
        assert f"{key} {value:g}" in html.unescape(metrics[0])


@pytest.mark.timeout(600)
def test_without_an_mlflow_url_nothing_is_recorded_and_incidents_name_no_run(
    federation: Any, mlflow_server: Any, namespace: str
) -> None:
    custom = client.CustomObjectsApi(federation.api_client(CITY))
    scenario, fleets = _typhoon_drill(federation, namespace, "unrecorded-underpass-drill")
    payload = scenario_payload(scenario, fleets, {}, CITY)  # an operator started without --mlflow-url
    assert "mlflowUrl" not in payload
    before = {r.info.run_id for r in _city_runs(mlflow_server.url)}

    writer = run_job(payload, KubeTarget(federation.kubeconfig, CITY))

    incidents = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "incidents")["items"]
    assert len(incidents) == writer.created > 0
    assert runs_named_by(incidents) == []
    assert all(ANNOTATION_MLFLOW_RUN not in (i["metadata"].get("annotations") or {}) for i in incidents)
    assert {r.info.run_id for r in _city_runs(mlflow_server.url)} == before
    page = build_page(DemoResult(incidents=[incident_record(CITY, i, {}) for i in incidents]))
    assert page.count(">not recorded<") == len(incidents)


def _city_runs(url: str) -> list[Any]:
    mlflow = registry_client(url)
    experiment = mlflow.get_experiment_by_name(experiment_name(CITY))
    return [] if experiment is None else list(mlflow.search_runs([experiment.experiment_id]))
