"""Scenario workloads of the embedded default: named actors on a local Ray cluster.

One actor per scenario revision, named ``<namespace>/<scenario>/<revision>`` in the Ray
namespace ``citynerve``: a reconcile after a crash of the operator's handlers (or a second
operator object in the same process) finds the running actor by name instead of starting a
second one. Actors are detached (found by name, not by handle), stopped when their revision is
replaced or their Scenario is gone, and end with the local Ray cluster.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime
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


#: CPUs a live scenario's actor reserves on the local Ray: scenarios beyond what the machine holds
#: wait (Pending, said in the Scenario's status) instead of starving each other
LIVE_ACTOR_CPUS = 0.5
#: the revision part of a live scenario's actor name: one actor per scenario, reconfigured in place
LIVE = "live"
LIVE_RETRY_SECONDS = 10.0
#: how MLflow's client is told its identity (basic auth, or a token)
MLFLOW_IDENTITY_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


class _RefusedError(Exception):
    """A new model version refused while the loaded one keeps scoring."""


class LiveScenarioActor:
    """Scores a live scenario's windows with its verified model, reconfigured in place.

    ``configure`` takes each new payload revision: thresholds apply to the next Incident; a new model
    version is downloaded, verified and loaded beside the running one and takes over at a step
    boundary (a refused artifact leaves the running model scoring, and says so); new fleets or
    broker access restart the consumer loop.
    """

    def __init__(self, kubeconfig: str | None, context: str | None) -> None:
        self.target = KubeTarget(Path(kubeconfig) if kubeconfig else None, context)
        self.revision: str | None = None
        self.message = "waiting for its configuration"
        self.failed = False
        self.loop: Any = None
        self.loaded: dict[str, Any] | None = None
        self.writer: Any = None
        self._key: tuple[Any, ...] | None = None
        self._applied = 0.0
        self._placement: tuple[tuple[str, str, str], Any] | None = None
        self._lock = threading.Lock()

    def configure(
        self, revision: str, payload: Mapping[str, Any], access: Mapping[str, str],
        registry: Mapping[str, str] | None = None,
    ) -> None:
        """Apply a revision (in the background: a model may take seconds to load); a revision that
        failed, or whose consumer loop stopped (the broker did not know its identity yet), is applied
        again at most every ``LIVE_RETRY_SECONDS``."""
        broken = self.failed or (self.loop is not None and self.loop.error is not None)
        due = broken and time.monotonic() - self._applied > LIVE_RETRY_SECONDS
        if revision == self.revision and not due:
            return
        self.revision, self._applied = revision, time.monotonic()
        os.environ.update(registry or {})  # this actor's own process: MLflow reads its identity here
        threading.Thread(target=self._apply, args=(dict(payload), dict(access)), daemon=True).start()

    def _apply(self, payload: dict[str, Any], access: dict[str, str]) -> None:
        from citynerve.models.registry import ModelResolutionError  # noqa: PLC0415 - in the actor's process

        with self._lock:
            try:
                self._configure(payload, access)
                self.failed, self.message = False, ""
            except _RefusedError as exc:  # a new version refused: the running one keeps scoring
                self.message = str(exc)
            except Exception as exc:  # noqa: BLE001 - said in the Scenario's status, tried again later
                log.warning("live scenario %s: %s", payload["scenario"]["name"], exc)
                self.failed = True
                self.message = exc.message if isinstance(exc, ModelResolutionError) else str(exc)

    def _configure(self, payload: dict[str, Any], access: dict[str, str]) -> None:
        from citynerve.operators.city.job import IncidentWriter  # noqa: PLC0415 - in the actor's process
        from citynerve.workloads.live import BrokerAccess, LiveScoring  # noqa: PLC0415
        from kubernetes import client  # noqa: PLC0415

        if self.writer is None:
            self.writer = IncidentWriter(client.ApiClient(self.target.client_configuration()), payload)
        self.writer.payload = payload  # thresholds and routes apply from the next detection on
        wanted, scorer = self._model(payload)
        key = (tuple(sorted(f["fleet"] for f in payload["fleets"])), tuple(sorted(access.items())),
               payload["spec"]["kind"])
        if self.loop is not None and key == self._key and self.loop.running:
            if scorer is not None:  # a new version: it takes over at the next step boundary
                self.loop.swap(scorer, wanted)
                self.loaded = wanted
            return
        if scorer is None:  # new fleets or access, the same model: a fresh scorer of it
            scorer = type(self.loop.scorer)(self.loop.scorer.detector, self.loop.scorer.context_steps)
        if self.loop is not None:
            self.loop.stop()
        self.loop = LiveScoring(BrokerAccess(**access), scorer, wanted, payload["fleets"], self._sink)
        self.loop.start()
        self.loaded, self._key = wanted, key

    def _model(self, payload: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
        """The model the payload names, and a scorer of it when it is not the one loaded (else None)."""
        from citynerve.models.pyfunc import load_verified_detector  # noqa: PLC0415 - in the actor's process
        from citynerve.models.registry import ModelResolutionError  # noqa: PLC0415
        from citynerve.workloads.scoring import LiveScoringError, scorer_for  # noqa: PLC0415

        detectors = [m for m in payload.get("models") or [] if m.get("role", "detector") == "detector"]
        if not detectors:
            raise LiveScoringError("a live scenario scores with a model: bind an AnalyticsModel in "
                                   "spec.models")
        ref = detectors[0]
        wanted = {"name": ref["name"], "registeredModel": ref["registeredModel"],
                  "version": ref.get("version"), "artifactDigest": ref.get("artifactDigest")}
        if self.loaded is not None and all(self.loaded[k] == v for k, v in wanted.items()):
            return self.loaded, None
        if not ref.get("version"):
            raise LiveScoringError(f"AnalyticsModel {ref['name']} has not resolved a version yet")
        try:
            verified = load_verified_detector(
                str(payload.get("mlflowUrl") or ""), ref["registeredModel"], str(ref["version"]),
                ref.get("artifactDigest"), f"the digest AnalyticsModel {ref['name']} verified",
            )
        except ModelResolutionError as exc:
            if self.loop is not None and self.loaded is not None:
                raise _RefusedError(
                    f"version {ref.get('version')} of {ref['registeredModel']} is refused ({exc.reason}: "
                    f"{exc.message}); version {self.loaded['version']} keeps scoring"
                ) from exc
            raise
        wanted["loadSeconds"] = round(verified.load_seconds, 3)
        return wanted, scorer_for(payload["spec"]["kind"], verified.detector)

    def _placed(self, event: Any, scorer: Any) -> Any:
        """The event at its asset's coordinates, where a bound fleet declares where its network lies."""
        from dataclasses import replace  # noqa: PLC0415

        from citynerve.workloads.sim.water import water_placement  # noqa: PLC0415

        spec = getattr(scorer.detector, "hydraulic_model", None)
        fleets = [f for f in (self.writer.payload.get("fleets") or []) if f.get("georeference")]
        if spec is None or not fleets:
            return event
        fleet, where = fleets[0]["fleet"], fleets[0]["georeference"]
        key = (spec.network, where["latitude"], where["longitude"])
        if self._placement is None or self._placement[0] != key:
            anchor = (float(where["latitude"]), float(where["longitude"]))
            self._placement = (key, water_placement(spec.network, anchor, where.get("description") or fleet))
        placement = self._placement[1]
        point = placement.locate(event.location.asset_id)
        if point is None:
            return event
        said = (f"Junction {event.location.asset_id} of network {spec.network}, placed by SensorFleet "
                f"{fleet}'s georeference: the model's centre at {placement.anchor_name} "
                f"({placement.anchor_lat:.4f}, {placement.anchor_lon:.4f}), its drawing scaled by its pipe "
                "lengths.")
        return replace(event, location=replace(event.location, lat=point[0], lon=point[1], placement=said))

    def _sink(self, event: Any, scorer: Any, model: Mapping[str, Any]) -> None:
        event = self._placed(event, scorer)
        first, last, windows = scorer.context
        decided = {"name": model["name"], "registeredModel": model["registeredModel"],
                   "version": str(model["version"]), "artifactDigest": model["artifactDigest"],
                   "firstWindow": rfc3339(datetime.fromtimestamp(first, UTC)),
                   "lastWindow": rfc3339(datetime.fromtimestamp(last, UTC)), "windows": windows}
        self.writer(event, decided)

    def report(self) -> dict[str, Any]:
        loop = self.loop
        error = loop.error if loop is not None else None
        running = loop is not None and loop.running and loop.progress.connected
        if self.failed or error is not None:
            state, message = "Failed", self.message or f"{type(error).__name__}: {error}"
        elif running:
            state, message = "Running", self.message
        else:
            state, message = "Pending", self.message or "connecting to the broker"
        progress = loop.progress if loop is not None else None
        return {
            "state": state,
            "message": message[:1000],
            "revision": self.revision,
            "incidents": self.writer.created if self.writer is not None else 0,
            "lastEvaluation": rfc3339(self.writer.last_evaluation)
            if self.writer is not None and self.writer.last_evaluation else None,
            "model": dict(self.loaded) if self.loaded and running else None,
            "scored": None if progress is None else {
                "windows": progress.windows, "steps": progress.steps, "lagWindows": progress.lag_windows,
                "lastWindowTime": progress.last_window_time(),
            },
        }

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.stop()


class LocalRayWorkloads:
    """Starts, observes and stops scenario actors on the local Ray cluster (started on first use)."""

    def __init__(self, city: str, target: KubeTarget, num_cpus: int = 2) -> None:
        self.city = city
        self.target = target
        self.num_cpus = num_cpus
        self._lock = threading.Lock()
        self._actor_class: Any = None
        self._live_class: Any = None

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
                self._live_class = ray.remote(num_cpus=LIVE_ACTOR_CPUS, max_concurrency=4)(LiveScenarioActor)
        return ray

    def ensure(
        self, namespace: str, scenario: str, revision: str, payload: Mapping[str, Any], replicas: int,
        access: Any = None,
    ) -> WorkloadObservation:
        """The actor of this revision, started if it is not running; and what it reports. A live
        scenario has one actor, reconfigured with each revision (``access``: the Scenario's
        ScoringAccess, its broker identity)."""
        if payload["spec"]["mode"] == "live":
            return self._ensure_live(namespace, scenario, revision, payload, access)
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

    def _ensure_live(
        self, namespace: str, scenario: str, revision: str, payload: Mapping[str, Any], access: Any
    ) -> WorkloadObservation:
        name = local_actor_name(self.city, namespace, scenario, LIVE)
        if access is None:
            return WorkloadObservation("ray.io/local", "RayActor", name, "Failed",
                                       message="the city has no broker to read its fleets' windows from "
                                               "(start the operator with --broker-url)")
        ray = self._ray()
        kubeconfig = str(self.target.kubeconfig) if self.target.kubeconfig else None
        actor = self._live_class.options(
            name=name, namespace=RAY_NAMESPACE, get_if_exists=True, lifetime="detached"
        ).remote(kubeconfig, self.target.context)
        credentials = {"url": access.url, "user": access.user, "password": access.password,
                       "consumer": access.consumer}
        # The operator's MLflow identity (MLflow's own variables), handed over in memory: Ray's
        # workers do not see variables the operator's process set after the local Ray started.
        registry = {k: v for k in MLFLOW_IDENTITY_VARIABLES if (v := os.environ.get(k))}
        try:
            ray.get(actor.configure.remote(revision, dict(payload), credentials, registry), timeout=5)
            report: dict[str, Any] = ray.get(actor.report.remote(), timeout=5)
        except ray.exceptions.GetTimeoutError:
            return WorkloadObservation(
                "ray.io/local", "RayActor", name, "Pending",
                message=f"waiting for {LIVE_ACTOR_CPUS:g} CPU on the local Ray, which every live scenario "
                        "reserves",
            )
        state = report["state"] if report["state"] in ("Running", "Failed") else "Pending"
        return WorkloadObservation(
            "ray.io/local", "RayActor", name, state,  # type: ignore[arg-type]
            ready_replicas=1 if state == "Running" else 0,
            message=report["message"],
            last_evaluation_time=report["lastEvaluation"],
            model=report["model"],
            scored=report["scored"],
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
