"""Scenario runs recorded in a real MLflow server (basic-auth, as the hub chart runs it) by the cities'
read identity, which can record its runs and still cannot touch a registered model."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from citynerve.models.incidents import CollectingSink
from citynerve.models.registry import (
    CITY_IDENTITY,
    TRAINER_IDENTITY,
    ModelResolutionError,
    register_model_version,
    registry_client,
    set_model_alias,
)
from citynerve.models.scenario_runs import (
    experiment_name,
    finish_scenario_run,
    read_scenario_run,
    start_scenario_run,
    summary_metrics,
)
from citynerve.operators.localfed.mlflow_server import LocalMlflow
from citynerve.workloads.runner import run_scenario
from mlflow.exceptions import MlflowException


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMlflow]:
    mlflow = LocalMlflow(tmp_path_factory.mktemp("mlflow"))
    mlflow.start()
    try:
        yield mlflow
    finally:
        mlflow.stop()


def _act_as(monkeypatch: pytest.MonkeyPatch, server: LocalMlflow, identity: str) -> None:
    for key, value in server.identity(identity).env().items():
        monkeypatch.setenv(key, value)


def test_summary_metrics_are_the_numbers_of_a_runner_summary() -> None:
    summary = {
        "kind": "urban-flood",
        "incidents": 7,
        "surge": True,
        "lead_time_s": {"10": 900.0, "15": 1200.0},
        "rehearsal": [{"lead_time_s": 1.0}],
        "series": {"timesS": [0.0]},
        "missing": float("nan"),
    }
    assert summary_metrics(summary) == {
        "incidents": 7.0,
        "surge": 1.0,
        "lead_time_s.10": 900.0,
        "lead_time_s.15": 1200.0,
    }


@pytest.mark.timeout(240)
def test_a_city_records_a_scenario_run_and_reads_it_back(
    server: LocalMlflow, monkeypatch: pytest.MonkeyPatch
) -> None:
    _act_as(monkeypatch, server, CITY_IDENTITY)
    sink = CollectingSink()
    summary = run_scenario({"kind": "urban-flood", "mode": "drill", "simulation": {}}, sink)
    series = {
        "thresholds": [{"metric": "waterLevelMm", "unitCode": "MMT", "warning": 150, "alarm": 270}],
        **summary.pop("series"),
    }
    params = {
        "city": "chengdu",
        "scenario": "typhoon-underpass-drill",
        "kind": "urban-flood",
        "mode": "drill",
    }
    experiment_id, run_id = start_scenario_run(server.url, "chengdu", "typhoon-underpass-drill-1", params)
    finish_scenario_run(server.url, run_id, summary, series)

    record = read_scenario_run(server.url, run_id)
    assert record.experiment_id == experiment_id
    assert record.status == "FINISHED"
    assert record.params == params
    assert record.metrics == summary_metrics(summary)
    assert record.metrics["incidents"] == len(sink.events)
    assert record.series == series  # what the detector scored, as it scored it
    run = registry_client(server.url).get_run(run_id)
    experiment = registry_client(server.url).get_experiment(run.info.experiment_id)
    assert experiment.name == experiment_name("chengdu")


@pytest.mark.timeout(240)
def test_a_run_that_failed_is_recorded_as_failed_without_series(
    server: LocalMlflow, monkeypatch: pytest.MonkeyPatch
) -> None:
    _act_as(monkeypatch, server, CITY_IDENTITY)
    _, run_id = start_scenario_run(server.url, "shanghai", "pipe-burst-drill-2", {"kind": "water-burst"})
    finish_scenario_run(server.url, run_id, None, None, failed=True)
    record = read_scenario_run(server.url, run_id)
    assert record.status == "FAILED"
    assert record.series == {}


@pytest.mark.timeout(240)
def test_recording_runs_gives_the_city_no_hold_on_registered_models(
    server: LocalMlflow, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    artifact = tmp_path / "model"
    artifact.mkdir()
    (artifact / "MLmodel").write_text("flavors: {}\n")
    _act_as(monkeypatch, server, TRAINER_IDENTITY)
    version = register_model_version(server.url, "scenario-runs-test-model", artifact, {"detectionRate": 1.0})
    _act_as(monkeypatch, server, CITY_IDENTITY)
    start_scenario_run(server.url, "chengdu", "after-registration", {"kind": "urban-flood"})
    with pytest.raises(ModelResolutionError) as refused:
        set_model_alias(server.url, "scenario-runs-test-model", "champion", version.version)
    assert refused.value.reason == "RegistryPermissionDenied"
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    with pytest.raises(MlflowException) as denied:
        register_model_version(server.url, "scenario-runs-test-model", copy)
    assert denied.value.error_code == "PERMISSION_DENIED"


@pytest.mark.timeout(60)
def test_an_unreachable_server_is_reported_as_unreachable() -> None:
    with pytest.raises(ModelResolutionError) as failed:
        start_scenario_run("http://127.0.0.1:9", "chengdu", "nowhere", {"kind": "urban-flood"})
    assert failed.value.reason == "RegistryUnreachable"
    assert "did not answer" in failed.value.message
