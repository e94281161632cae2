"""The city operator's Kopf handlers: thin, named ``<kind>_<event>``, each one queues a key to reconcile.

The handlers run on Kopf's event loop and only put ``(kind, namespace, name)`` on a work queue;
worker threads reconcile each key from a fresh read (``workqueue``). Every handler watches
events (``kopf.on.event``), so Kopf keeps no progress or last-handled annotations and adds no
finalizer: the only writes are the reconciler's, and only when something differs. Nothing here
needs external cleanup that Kubernetes' owner references do not do, except local Ray actors,
which die with the operator's process and are swept by the resync when their Scenario is gone.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable
from typing import Any, cast

import kopf
from citynerve.operators.api import GROUP, VERSION
from citynerve.operators.city.config import (
    LABEL_COMPONENT,
    LABEL_FLEET,
    LABEL_MANAGED_BY,
    LABEL_SCENARIO,
    MANAGED_BY,
    CityOptions,
)
from citynerve.operators.city.reconcile import CityReconciler
from citynerve.operators.city.workqueue import WorkQueue, start_workers
from citynerve.operators.runtime import OperatorOptions, new_registry

log = logging.getLogger(__name__)
# Status times have whole seconds: waking a little after a retry's time finds it due.
RETRY_MARGIN_SECONDS = 0.5


def _namespaced(namespace: str | None) -> str:
    assert namespace, "every city kind and child is namespaced"
    return namespace


def build_registry(
    options: OperatorOptions, city: CityOptions, reconciler: CityReconciler | None = None
) -> kopf.OperatorRegistry:
    """A registry with the runtime's login and settings plus the city handlers."""
    registry = new_registry(options)
    rec = reconciler or CityReconciler(options, city)
    queue = WorkQueue()
    stop = threading.Event()

    def reconcile(key: Hashable) -> None:
        """What a worker does with a key: reconcile the object, then what depends on it."""
        kind, namespace, name = cast("tuple[str, str, str]", key)
        if kind == "SensorFleet":
            rec.reconcile_fleet(namespace, name)
            for scenario in rec.scenarios_referencing(namespace, fleet=name):
                queue.add(("Scenario", namespace, scenario))
        elif kind == "AnalyticsModel":
            rec.reconcile_model(namespace, name)
            for scenario in rec.scenarios_referencing(namespace, model=name):
                queue.add(("Scenario", namespace, scenario))
        elif kind == "Scenario":
            rec.reconcile_scenario(namespace, name)  # a deleted scenario's workloads are stopped
        elif kind == "Incident":
            retry_in = rec.reconcile_incident(namespace, name)
            if retry_in is not None:  # a failed delivery's next attempt (kept in status for restarts)
                queue.add_after(key, retry_in + RETRY_MARGIN_SECONDS)

    # The handlers run on Kopf's event loop and only queue keys: they never block it.
    @kopf.on.event(GROUP, VERSION, "sensorfleets", registry=registry)
    async def sensorfleet_event(type: str, name: str, namespace: str | None, **_: Any) -> None:
        if type == "DELETED":
            rec.forget("SensorFleet", _namespaced(namespace), name)
        queue.add(("SensorFleet", _namespaced(namespace), name))

    @kopf.on.event(GROUP, VERSION, "analyticsmodels", registry=registry)
    async def analyticsmodel_event(type: str, name: str, namespace: str | None, **_: Any) -> None:
        if type == "DELETED":
            rec.forget("AnalyticsModel", _namespaced(namespace), name)
        queue.add(("AnalyticsModel", _namespaced(namespace), name))

    @kopf.on.event(GROUP, VERSION, "scenarios", registry=registry)
    async def scenario_event(type: str, name: str, namespace: str | None, **_: Any) -> None:
        if type == "DELETED":
            rec.forget("Scenario", _namespaced(namespace), name)
        queue.add(("Scenario", _namespaced(namespace), name))

    @kopf.on.event(GROUP, VERSION, "incidents", registry=registry)
    async def incident_event(type: str, name: str, namespace: str | None, spec: kopf.Spec, **_: Any) -> None:
        namespace = _namespaced(namespace)
        scenario = rec.open_incidents.observe(namespace, name, spec, deleted=type == "DELETED")
        if type != "DELETED":
            queue.add(("Incident", namespace, name))
        if rec.open_count_changed(namespace, scenario):  # its count of open incidents
            queue.add(("Scenario", namespace, scenario))

    @kopf.on.event(
        "apps",
        "v1",
        "deployments",
        registry=registry,
        labels={LABEL_MANAGED_BY: MANAGED_BY, LABEL_COMPONENT: "ingest", LABEL_FLEET: kopf.PRESENT},
    )
    async def deployment_event(labels: kopf.Labels, namespace: str | None, **_: Any) -> None:
        # Its fleet's reconcile corrects drift and undoes a deletion.
        queue.add(("SensorFleet", _namespaced(namespace), labels[LABEL_FLEET]))

    if city.workload_mode == "kuberay":

        @kopf.on.event(
            "ray.io",
            "v1",
            "rayjobs",
            registry=registry,
            labels={LABEL_MANAGED_BY: MANAGED_BY, LABEL_SCENARIO: kopf.PRESENT},
        )
        async def rayjob_event(labels: kopf.Labels, namespace: str | None, **_: Any) -> None:
            queue.add(("Scenario", _namespaced(namespace), labels[LABEL_SCENARIO]))

    @kopf.on.startup(registry=registry)
    def operator_startup(**_: Any) -> None:
        # Before any resource handler runs (Kopf starts watching after startup): every Scenario's
        # first reconcile counts all of its open Incidents, so a restart writes no partial count.
        rec.load_open_incidents()
        # The broker's users are written whole, so every fleet is listed before any is reconciled.
        rec.load_fleets()
        start_workers(queue, reconcile, options.max_workers, f"reconcile-{options.name}")
        if rec.broker is not None:
            # A fleet's worker writes its status on the broker: that is what queues the fleet.
            rec.broker.watch_status(_queue_fleet)

        def loop() -> None:
            while not stop.wait(city.resync_seconds):
                try:
                    rec.resync(queue.add)
                except Exception:
                    log.exception("periodic resync failed; trying again in %.0f s", city.resync_seconds)

        stop.clear()
        threading.Thread(target=loop, name=f"resync-{options.name}", daemon=True).start()

    def _queue_fleet(fleet: str) -> None:
        namespace = rec.fleet_namespace(fleet)
        if namespace is not None:
            queue.add(("SensorFleet", namespace, fleet))

    @kopf.on.cleanup(registry=registry)
    def operator_cleanup(**_: Any) -> None:
        stop.set()
        queue.close()
        if rec.broker is not None:
            rec.broker.close()

    return registry
