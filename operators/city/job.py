"""The analytics job of a scenario: run its analytics and turn detections into Incident resources.

The same code runs as a KubeRay RayJob's entrypoint (``python -m citynerve.operators.city.job``,
in-cluster credentials, payload in ``CITYNERVE_SCENARIO``) and in a local Ray actor of the
embedded default (the operator's own credentials).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from citynerve.models.incidents import IncidentEvent
from citynerve.models.registry import ModelResolutionError
from citynerve.models.scenario_runs import finish_scenario_run, start_scenario_run
from citynerve.observability import configure_telemetry, incident_span
from citynerve.operators.api import GROUP, VERSION
from citynerve.operators.city.analytics import run_analytics
from citynerve.operators.city.children import incident_manifest, incident_severity, workload_revision
from citynerve.operators.city.config import ANNOTATION_MLFLOW_RUN, centre_of
from citynerve.operators.runtime import KubeTarget
from kubernetes import client

log = logging.getLogger(__name__)
T = TypeVar("T")


class IncidentWriter:
    """An incident sink that creates one Incident per detection; a re-run creates no duplicate.

    A detection below every warning threshold of the Scenario is not an Incident: it is logged
    with its figures and counted in ``not_raised``.
    """

    def __init__(self, api: client.ApiClient, payload: Mapping[str, Any]) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.payload = payload
        self.centre = centre_of(str(payload.get("city") or ""))
        self.created = 0
        self.not_raised = 0
        self.last_evaluation: datetime | None = None
        self.annotations: dict[str, str] = {}  # for every Incident: the run that recorded it

    def __call__(self, event: IncidentEvent, decided_by: Mapping[str, Any] | None = None) -> None:
        """Create the detection's Incident; ``decided_by`` names the live model version and windows."""
        now = datetime.now(UTC).replace(microsecond=0)
        detection = event.to_dict()
        decision = incident_severity(detection, self.payload["spec"]["thresholds"])
        if decision.severity is None:
            self.not_raised += 1
            log.info("scenario %s: the detection at %s is not an Incident. %s",
                     self.payload["scenario"]["name"], event.location.asset_id, decision.reason)
            self.last_evaluation = now
            return
        manifest = incident_manifest(detection, self.payload, now, self.centre, decision, decided_by)
        namespace = manifest["metadata"]["namespace"]
        with incident_span(event, city=str(self.payload.get("city") or ""),
                           name=manifest["metadata"]["name"], namespace=namespace) as annotations:
            # The trace continues in the operator's reconciles and the webhooks of this Incident.
            manifest["metadata"].setdefault("annotations", {}).update({**annotations, **self.annotations})
            try:
                self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "incidents", manifest)
                self.created += 1
            except client.ApiException as exc:
                if exc.status != 409:  # the same detection, already recorded by an earlier run
                    raise
        self.last_evaluation = now


def run_params(payload: Mapping[str, Any]) -> dict[str, str]:
    """What a scenario run is recorded with in MLflow: where it ran, what it bound (pure)."""
    scenario, spec = payload["scenario"], payload["spec"]
    params = {
        "city": str(payload.get("city") or ""),
        "namespace": scenario["namespace"],
        "scenario": scenario["name"],
        "revision": workload_revision(payload),
        "kind": spec["kind"],
        "mode": spec["mode"],
    }
    for model in payload.get("models") or []:
        params[f"model.{model['name']}"] = f"{model['registeredModel']} version {model.get('version') or '-'}"
    for t in spec.get("thresholds") or []:
        warning, alarm, unit = t.get("warning"), t.get("alarm"), t.get("unitCode")
        params[f"threshold.{t['metric']}"] = f"warning {warning} {unit}, alarm {alarm} {unit}"
    for key, value in sorted((spec.get("simulation") or {}).items()):
        params[f"simulation.{key}"] = str(value)
    return params


def _recorded(what: str, call: Callable[[], T]) -> T | None:
    """``call()``, or None when MLflow refused or did not answer: the scenario still runs and its
    Incidents are still created, without a record of the run (said in the log)."""
    try:
        return call()
    except ModelResolutionError as exc:
        log.warning("%s is not recorded in MLflow: %s", what, exc.message)
        return None


def run_job(payload: Mapping[str, Any], target: KubeTarget) -> IncidentWriter:
    """Run the scenario's analytics, creating its Incidents; with ``mlflowUrl`` in the payload, record
    the run in MLflow (parameters, metrics, the scored series) and name it on every Incident."""
    writer = IncidentWriter(client.ApiClient(target.client_configuration()), payload)
    url: str | None = payload.get("mlflowUrl")
    params = run_params(payload)
    what = f"the run of scenario {params['namespace']}/{params['scenario']}"
    run_id: str | None = None
    if url:
        name = f"{params['scenario']}-{params['revision'][:8]}"
        started = _recorded(what, lambda: start_scenario_run(url, params["city"], name, params))
        run_id = started[1] if started else None
    if run_id:
        writer.annotations[ANNOTATION_MLFLOW_RUN] = run_id
    try:
        summary = run_analytics(payload, writer)
    except BaseException:
        if url and run_id:
            _recorded(what, lambda: finish_scenario_run(url, run_id, None, None, failed=True))
        raise
    if url and run_id:
        series = {"thresholds": list(payload["spec"].get("thresholds") or []), **summary.pop("series", {})}
        summary["incidentsCreated"] = writer.created
        _recorded(what, lambda: finish_scenario_run(url, run_id, summary, series))
    return writer


def main() -> int:
    logging.basicConfig(level=logging.INFO)
    payload: dict[str, Any] = json.loads(os.environ["CITYNERVE_SCENARIO"])
    configure_telemetry("citynerve-city-job", city=str(payload.get("city") or ""))
    writer = run_job(payload, KubeTarget())
    run = writer.annotations.get(ANNOTATION_MLFLOW_RUN)
    log.info("scenario %s: %d incident(s) created; %s", payload["scenario"]["name"], writer.created,
             f"recorded as MLflow run {run}" if run else "not recorded in MLflow")
    return 0


if __name__ == "__main__":
    sys.exit(main())
