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
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from citynerve.models.incidents import IncidentEvent
from citynerve.observability import configure_telemetry, incident_span
from citynerve.operators.api import GROUP, VERSION
from citynerve.operators.city.analytics import run_analytics
from citynerve.operators.city.children import incident_manifest, incident_severity
from citynerve.operators.city.config import centre_of
from citynerve.operators.runtime import KubeTarget
from kubernetes import client

log = logging.getLogger(__name__)


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

    def __call__(self, event: IncidentEvent) -> None:
        now = datetime.now(UTC).replace(microsecond=0)
        detection = event.to_dict()
        decision = incident_severity(detection, self.payload["spec"]["thresholds"])
        if decision.severity is None:
            self.not_raised += 1
            log.info("scenario %s: the detection at %s (simulated minute %.0f) is not an Incident. %s",
                     self.payload["scenario"]["name"], event.location.asset_id, event.detected_at_s / 60,
                     decision.reason)
            self.last_evaluation = now
            return
        manifest = incident_manifest(detection, self.payload, now, self.centre, decision)
        namespace = manifest["metadata"]["namespace"]
        with incident_span(event, city=str(self.payload.get("city") or ""),
                           name=manifest["metadata"]["name"], namespace=namespace) as annotations:
            # The trace continues in the operator's reconciles and the webhooks of this Incident.
            manifest["metadata"].setdefault("annotations", {}).update(annotations)
            try:
                self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "incidents", manifest)
                self.created += 1
            except client.ApiException as exc:
                if exc.status != 409:  # the same detection, already recorded by an earlier run
                    raise
        self.last_evaluation = now


def run_job(payload: Mapping[str, Any], target: KubeTarget) -> IncidentWriter:
    writer = IncidentWriter(client.ApiClient(target.client_configuration()), payload)
    run_analytics(payload, writer)
    return writer


def main() -> int:
    logging.basicConfig(level=logging.INFO)
    payload: dict[str, Any] = json.loads(os.environ["CITYNERVE_SCENARIO"])
    configure_telemetry("citynerve-city-job", city=str(payload.get("city") or ""))
    writer = run_job(payload, KubeTarget())
    log.info("scenario %s: %d incident(s) created", payload["scenario"]["name"], writer.created)
    return 0


if __name__ == "__main__":
    sys.exit(main())
