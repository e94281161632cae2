"""Scenario workloads of the embedded default: named actors on a local Ray cluster.

One actor per scenario revision, named ``<namespace>/<scenario>/<revision>`` in the Ray
namespace ``citynerve``: a reconcile after a crash of the operator's handlers (or a second
operator object in the same process) finds the running actor by name instead of starting a
second one. Actors are detached (found by name, not by handle), stopped when their revision is
replaced or their Scenario is gone, and end with the local Ray cluster.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from citynerve.observability.logs import adopt_logger
from citynerve.operators.city.children import local_actor_name, parse_local_actor_name
from citynerve.operators.city.status import WorkloadObservation
from citynerve.operators.conditions import rfc3339
from citynerve.operators.runtime import KubeTarget

RAY_NAMESPACE = "citynerve"
log = logging.getLogger(__name__)


class ScenarioActor:
    """Runs one scenario revision on a thread; ``report`` answers while it runs."""

    def __init__(self, payload: Mapping[str, Any], kubeconfig: str | None, context: str | None) -> None:
        self.payload = payload
        self.target = KubeTarget(Path(kubeconfig) if kubeconfig else None, context)
        self.state = "Running"
        self.message = ""
        self.incidents = 0
        self.last_evaluation: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from citynerve.operators.city.job import run_job  # noqa: PLC0415 - in the actor's process

        try:
            writer = run_job(self.payload, self.target)
        except Exception as exc:
            log.exception("scenario workload failed")
            self.state, self.message = "Failed", f"{type(exc).__name__}: {exc}"[:1000]
            return
        self.incidents = writer.created
        self.last_evaluation = rfc3339(writer.last_evaluation) if writer.last_evaluation else None
        self.state = "Succeeded" if not self._stop.is_set() else "Stopped"

    def report(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "message": self.message,
            "incidents": self.incidents,
            "lastEvaluation": self.last_evaluation,
        }

    def stop(self) -> None:
        self._stop.set()


class LocalRayWorkloads:
    """Starts, observes and stops scenario actors on the local Ray cluster (started on first use)."""

    def __init__(self, city: str, target: KubeTarget, num_cpus: int = 2) -> None:
        self.city = city
        self.target = target
        self.num_cpus = num_cpus
        self._lock = threading.Lock()
        self._actor_class: Any = None

    def _ray(self) -> Any:
        import ray  # noqa: PLC0415 - Ray is only loaded in the local workload mode

        adopt_logger("ray")
        with self._lock:
            if not ray.is_initialized():
                ray.init(
                    num_cpus=self.num_cpus,
                    include_dashboard=False,
                    namespace=RAY_NAMESPACE,
                    ignore_reinit_error=True,
                    log_to_driver=False,
                    configure_logging=False,  # Ray's lines come through the process's handler
                )
                adopt_logger("ray")
            if self._actor_class is None:
                self._actor_class = ray.remote(num_cpus=0, max_concurrency=4)(ScenarioActor)
        return ray

    def ensure(
        self, namespace: str, scenario: str, revision: str, payload: Mapping[str, Any], replicas: int
    ) -> WorkloadObservation:
        """The actor of this revision, started if it is not running; and what it reports."""
        ray = self._ray()
        name = local_actor_name(self.city, namespace, scenario, revision)
        kubeconfig = str(self.target.kubeconfig) if self.target.kubeconfig else None
        # Detached, so the actor outlives the handle (and an operator object restarted in this
        # process finds it by name); it ends with its scenario revision or with the Ray cluster.
        actor = self._actor_class.options(
            name=name, namespace=RAY_NAMESPACE, get_if_exists=True, lifetime="detached"
        ).remote(dict(payload), kubeconfig, self.target.context)
        report: dict[str, Any] = ray.get(actor.report.remote(), timeout=30)
        state = {"Running": "Running", "Succeeded": "Succeeded", "Failed": "Failed"}.get(
            report["state"], "Pending"
        )
        return WorkloadObservation(
            "ray.io/local",
            "RayActor",
            name,
            state,  # type: ignore[arg-type]
            ready_replicas=replicas if state == "Running" else 0,
            message=report["message"],
            last_evaluation_time=report["lastEvaluation"],
        )

    def _named(self) -> list[str]:
        ray = self._ray()
        return [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a.get("namespace") == RAY_NAMESPACE
        ]

    def _kill(self, name: str) -> None:
        ray = self._ray()
        try:
            actor = ray.get_actor(name, namespace=RAY_NAMESPACE)
        except ValueError:
            return
        try:
            ray.get(actor.stop.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - it is being killed anyway
            log.debug("actor %s did not acknowledge stop", name)
        ray.kill(actor)

    def stop(self, namespace: str, scenario: str, keep_revision: str | None = None) -> int:
        """Stop the scenario's actors except ``keep_revision``; returns how many were stopped."""
        stopped = 0
        for name in self._named():
            parsed = parse_local_actor_name(name)
            if parsed and parsed[:3] == (self.city, namespace, scenario) and parsed[3] != keep_revision:
                self._kill(name)
                stopped += 1
        return stopped

    def sweep(self, existing: Collection[tuple[str, str]], watched: Callable[[str], bool]) -> int:
        """Stop this city's actors whose Scenario no longer exists in a watched namespace."""
        stopped = 0
        for name in self._named():
            parsed = parse_local_actor_name(name)
            if parsed and parsed[0] == self.city and watched(parsed[1]) and parsed[1:3] not in existing:
                self._kill(name)
                stopped += 1
        return stopped

    @property
    def started(self) -> bool:
        return self._actor_class is not None
