"""The city operator's Kopf handlers: thin, named ``<kind>_<event>``, each one a call into the reconciler.

Every handler watches events (``kopf.on.event``), so Kopf keeps no progress or last-handled
annotations and adds no finalizer: the only writes are the reconciler's, and only when
something differs. Nothing here needs external cleanup that Kubernetes' owner references do
not do, except local Ray actors, which die with the operator's process and are swept by the
resync when their Scenario is gone.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import kopf
from citynerve.operators.api import GROUP, VERSION
from citynerve.operators.city.config import (
    LABEL_COMPONENT,
    LABEL_FLEET,
    LABEL_INGEST_REPORT,
    LABEL_MANAGED_BY,
    LABEL_SCENARIO,
    MANAGED_BY,
    CityOptions,
)
from citynerve.operators.city.reconcile import CityReconciler
from citynerve.operators.runtime import OperatorOptions, new_registry

log = logging.getLogger(__name__)


def _namespaced(namespace: str | None) -> str:
    assert namespace, "every city kind and child is namespaced"
    return namespace


def build_registry(
    options: OperatorOptions, city: CityOptions, reconciler: CityReconciler | None = None
) -> kopf.OperatorRegistry:
    """A registry with the runtime's login and settings plus the city handlers."""
    registry = new_registry(options)
    rec = reconciler or CityReconciler(options, city)
    stop = threading.Event()

    def scenarios(namespace: str, **refs: str | None) -> None:
        """Reconcile the scenarios that reference a fleet or a model."""
        for name in rec.scenarios_referencing(namespace, **refs):
            rec.reconcile_scenario(namespace, name)

    @kopf.on.event(GROUP, VERSION, "sensorfleets", registry=registry)
    def sensorfleet_event(type: str, name: str, namespace: str | None, **_: Any) -> None:
        namespace = _namespaced(namespace)
        if type == "DELETED":
            rec.forget("SensorFleet", namespace, name)
        else:
            rec.reconcile_fleet(namespace, name)
        scenarios(namespace, fleet=name)

    @kopf.on.event(GROUP, VERSION, "analyticsmodels", registry=registry)
    def analyticsmodel_event(type: str, name: str, namespace: str | None, **_: Any) -> None:
        namespace = _namespaced(namespace)
        if type == "DELETED":
            rec.forget("AnalyticsModel", namespace, name)
        else:
            rec.reconcile_model(namespace, name)
        scenarios(namespace, model=name)

    @kopf.on.event(GROUP, VERSION, "scenarios", registry=registry)
    def scenario_event(type: str, name: str, namespace: str | None, **_: Any) -> None:
        namespace = _namespaced(namespace)
        rec.reconcile_scenario(namespace, name)  # a deleted scenario's workloads are stopped
        if type == "DELETED":
            rec.forget("Scenario", namespace, name)

    @kopf.on.event(GROUP, VERSION, "incidents", registry=registry)
    def incident_event(type: str, name: str, namespace: str | None, spec: kopf.Spec, **_: Any) -> None:
        namespace = _namespaced(namespace)
        scenario = rec.open_incidents.observe(namespace, name, spec, deleted=type == "DELETED")
        if type != "DELETED":
            rec.reconcile_incident(namespace, name)
        if rec.open_count_changed(namespace, scenario):  # its count of open incidents
            rec.reconcile_scenario(namespace, scenario)

    @kopf.on.event(
        "apps",
        "v1",
        "deployments",
        registry=registry,
        labels={LABEL_MANAGED_BY: MANAGED_BY, LABEL_COMPONENT: "ingest", LABEL_FLEET: kopf.PRESENT},
    )
    def deployment_event(labels: kopf.Labels, namespace: str | None, **_: Any) -> None:
        namespace = _namespaced(namespace)
        rec.reconcile_fleet(namespace, labels[LABEL_FLEET])  # drift corrected, deletion undone

    @kopf.on.event("", "v1", "configmaps", registry=registry, labels={LABEL_INGEST_REPORT: kopf.PRESENT})
    def configmap_event(labels: kopf.Labels, namespace: str | None, **_: Any) -> None:
        namespace = _namespaced(namespace)
        rec.reconcile_fleet(namespace, labels[LABEL_INGEST_REPORT])

    if city.workload_mode == "kuberay":

        @kopf.on.event(
            "ray.io",
            "v1",
            "rayjobs",
            registry=registry,
            labels={LABEL_MANAGED_BY: MANAGED_BY, LABEL_SCENARIO: kopf.PRESENT},
        )
        def rayjob_event(labels: kopf.Labels, namespace: str | None, **_: Any) -> None:
            namespace = _namespaced(namespace)
            rec.reconcile_scenario(namespace, labels[LABEL_SCENARIO])

    @kopf.on.startup(registry=registry)
    def operator_startup(**_: Any) -> None:
        # Before any resource handler runs (Kopf starts watching after startup): every Scenario's
        # first reconcile counts all of its open Incidents, so a restart writes no partial count.
        rec.load_open_incidents()

        def loop() -> None:
            while not stop.wait(city.resync_seconds):
                try:
                    rec.resync()
                except Exception:
                    log.exception("periodic resync failed; trying again in %.0f s", city.resync_seconds)

        stop.clear()
        threading.Thread(target=loop, name=f"resync-{options.name}", daemon=True).start()

    @kopf.on.cleanup(registry=registry)
    def operator_cleanup(**_: Any) -> None:
        stop.set()

    return registry
