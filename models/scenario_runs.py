"""What a scenario workload scored, recorded as an MLflow run, and read back for the duty officer.

Each run of a Scenario's workload (``citynerve.operators.city.job``) records one run in the
experiment ``citynerve-scenario-runs-<city>``:

* parameters: city, namespace, scenario, revision, kind, mode, each bound model's registered
  name and version, the Scenario's thresholds, and the simulation's settings in strings;
* metrics: the runner's summary, flattened (``incidents``, ``warnings``, ``leadTimeSeconds.<node>``…);
* artifacts: ``series.json`` (the series the detector scored, in the units it names, with the
  Scenario's thresholds) and ``summary.json`` (the runner's whole summary).

Incidents name their run (annotation ``citynerve.io/mlflow-run-id``), and the report reads every
figure it draws from here (``read_scenario_run``), never from a second simulation.

The experiment is created by the first identity that records in it and is owned by it (MLflow's
basic-auth grants its creator ``MANAGE``); writing runs needs no permission on registered
models, so an identity that only reads models (the cities') can record here and still cannot
register a version or move an alias. Errors are those of ``citynerve.models.registry``
(``ModelResolutionError`` with reason ``RegistryUnreachable``, ``RegistryUnauthenticated``,
``RegistryPermissionDenied`` or ``RegistryError``).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from citynerve.models.registry import ModelResolutionError, _client, _registry_call, ensure_experiment

EXPERIMENT_PREFIX = "citynerve-scenario-runs"
SERIES_ARTIFACT = "series.json"
SUMMARY_ARTIFACT = "summary.json"
_BATCH_LIMIT = 1000  # MLflow's limit on metrics in one log_batch call
_PARAM_LIMIT = 100  # MLflow's limit on params in one log_batch call
_VALUE_LIMIT = 6000  # MLflow's longest parameter value


def experiment_name(city: str) -> str:
    """The experiment a city's scenario runs are recorded in."""
    return f"{EXPERIMENT_PREFIX}-{city}"


def run_page_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI's page of a run."""
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def summary_metrics(summary: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a runner summary as MLflow metrics (pure): numbers and booleans as they are,
    mappings flattened with ``.``; strings, lists and ``series`` are left to the artifacts."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        if not prefix and key == "series":
            continue
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            out[name] = 1.0 if value else 0.0
        elif isinstance(value, int | float) and math.isfinite(float(value)):
            out[name] = float(value)
        elif isinstance(value, Mapping):
            out.update(summary_metrics(value, f"{name}."))
    return out


@dataclass(frozen=True)
class ScenarioRunRecord:
    """A recorded scenario run as MLflow holds it."""

    run_id: str
    experiment_id: str
    status: str
    params: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    series: Mapping[str, Any] = field(default_factory=dict)

    def url(self, tracking_uri: str) -> str:
        return run_page_url(tracking_uri, self.experiment_id, self.run_id)


@contextmanager
def _reachable(tracking_uri: str) -> Iterator[None]:
    import requests  # noqa: PLC0415 - MLflow's transport; its errors mean the server is unreachable

    try:
        yield
    except requests.exceptions.RequestException as exc:
        raise ModelResolutionError(
            "RegistryUnreachable",
            f"the MLflow server at {tracking_uri} did not answer: {exc}",
            permanent=False,
        ) from exc


def start_scenario_run(
    tracking_uri: str, city: str, run_name: str, params: Mapping[str, str]
) -> tuple[str, str]:
    """Open a run for one scenario workload in its city's experiment; returns (experiment id, run id)."""
    from mlflow.entities import Param  # noqa: PLC0415

    client = _client(tracking_uri)
    name = experiment_name(city)
    with _reachable(tracking_uri):
        experiment_id = _registry_call(f"experiment {name!r}", ensure_experiment, client, name)
        run = _registry_call(
            f"a run in experiment {name!r}", client.create_run, experiment_id, run_name=run_name
        )
        run_id = str(run.info.run_id)
        entries = [Param(k, str(v)[:_VALUE_LIMIT]) for k, v in sorted(params.items())]
        for start in range(0, len(entries), _PARAM_LIMIT):
            _registry_call(
                f"the parameters of run {run_id}",
                client.log_batch,
                run_id,
                params=entries[start : start + _PARAM_LIMIT],
            )
    return experiment_id, run_id


def finish_scenario_run(
    tracking_uri: str,
    run_id: str,
    summary: Mapping[str, Any] | None,
    series: Mapping[str, Any] | None,
    *,
    failed: bool = False,
) -> None:
    """Log the run's metrics (from ``summary``), its ``series.json`` and ``summary.json``, and end it
    (``FAILED`` when ``failed``)."""
    from mlflow.entities import Metric  # noqa: PLC0415

    client = _client(tracking_uri)
    with _reachable(tracking_uri):
        if summary is not None:
            metrics = [Metric(k, v, 0, 0) for k, v in sorted(summary_metrics(summary).items())]
            for start in range(0, len(metrics), _BATCH_LIMIT):
                _registry_call(
                    f"the metrics of run {run_id}",
                    client.log_batch,
                    run_id,
                    metrics=metrics[start : start + _BATCH_LIMIT],
                )
            rest = {k: v for k, v in summary.items() if k != "series"}
            text = json.dumps(rest, indent=1, sort_keys=True, default=str)
            what = f"{SUMMARY_ARTIFACT} of run {run_id}"
            _registry_call(what, client.log_text, run_id, text, SUMMARY_ARTIFACT)
        if series is not None:
            text = json.dumps(series, separators=(",", ":"), sort_keys=True, allow_nan=False)
            what = f"{SERIES_ARTIFACT} of run {run_id}"
            _registry_call(what, client.log_text, run_id, text, SERIES_ARTIFACT)
        _registry_call(
            f"ending run {run_id}", client.set_terminated, run_id, status="FAILED" if failed else "FINISHED"
        )


def read_scenario_run(tracking_uri: str, run_id: str) -> ScenarioRunRecord:
    """A recorded scenario run: its parameters, metrics and ``series.json`` (empty when it has none)."""
    client = _client(tracking_uri)
    with _reachable(tracking_uri):
        run = _registry_call(f"run {run_id}", client.get_run, run_id)
        listed = _registry_call(f"the artifacts of run {run_id}", client.list_artifacts, run_id)
        series: dict[str, Any] = {}
        if any(a.path == SERIES_ARTIFACT for a in listed):  # none when the run failed before its end
            with tempfile.TemporaryDirectory(prefix="citynerve-run-") as tmp:
                what = f"{SERIES_ARTIFACT} of run {run_id}"
                path = _registry_call(what, client.download_artifacts, run_id, SERIES_ARTIFACT, tmp)
                series = json.loads(Path(path).read_text())
    return ScenarioRunRecord(
        run_id=run_id,
        experiment_id=str(run.info.experiment_id),
        status=str(run.info.status),
        params=dict(run.data.params),
        metrics={k: float(v) for k, v in run.data.metrics.items()},
        series=series,
    )
