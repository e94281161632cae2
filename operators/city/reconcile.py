"""Level-triggered reconcilers of the city kinds: read, compare with the desired state, write the difference.

Each ``reconcile_*`` reads the object and what it owns, builds the desired children and status
with the pure functions of ``children`` and ``status``, and writes only what differs: a no-op
reconcile makes no API write. Every reconcile comes from the operator's work queue (events,
children's events and the periodic resync all queue keys), which gives one object to one
worker at a time.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from citynerve.models.registry import ModelResolutionError, ResolvedModel, resolve_model_version
from citynerve.observability import reconcile_span, record_incident_transitions, webhook_span
from citynerve.operators.api import API_VERSION
from citynerve.operators.api.events import ALERT_DELIVERED, ALERT_FAILED, INCIDENT_DETECTED, EventReason
from citynerve.operators.city import alerts
from citynerve.operators.city.broker import (
    AUTH_KEY,
    AUTH_SECRET,
    PASSWORD_KEY,
    USERNAME_KEY,
    BrokerAdmin,
    Credentials,
    FleetIdentity,
    ScenarioIdentity,
    ScoringAccess,
)
from citynerve.operators.city.children import (
    child_conflict,
    child_patch,
    deployment_drifted,
    desired_fleet_secret,
    desired_history_claim,
    desired_ingest_deployment,
    desired_ingest_service,
    desired_ingest_service_account,
    desired_rayjob,
    drifted,
    ingest_name,
    ingest_secret_name,
    mqtt_secret_name,
    owner_reference,
    replacement,
    scenario_payload,
    scoring_secret_name,
    workload_revision,
)
from citynerve.operators.city.config import LABEL_MANAGED_BY, LABEL_SCENARIO, MANAGED_BY, CityOptions
from citynerve.operators.city.local import LIVE, LocalRayWorkloads
from citynerve.operators.city.status import (
    SensorTypeLookup,
    WorkloadObservation,
    compute_fleet_status,
    compute_incident_status,
    compute_model_status,
    compute_scenario_status,
    incident_detected_message,
    missing_references,
    running_models,
    scenario_events,
)
from citynerve.operators.conditions import find_condition, parse_time, rfc3339, status_patch
from citynerve.operators.kube import KubeRest, object_path
from citynerve.operators.runtime import OperatorOptions
from citynerve.workloads.dataplane.names import scoring_identity
from kubernetes import client

log = logging.getLogger(__name__)
# Steps on the way to Ready are not worth an Event; arriving, failing and recovering are.
TRANSIENT_REASONS = {"DeploymentMissing", "DeploymentProgressing", "WorkloadPending"}
PLURALS = {
    "SensorFleet": "sensorfleets",
    "AnalyticsModel": "analyticsmodels",
    "Scenario": "scenarios",
    "Incident": "incidents",
}
# The plain children of a fleet besides its Deployment: (apiVersion, plural) by kind.
CHILD_PATHS = {
    "ServiceAccount": ("v1", "serviceaccounts"),
    "Service": ("v1", "services"),
    "Secret": ("v1", "secrets"),
}
# How far back a new Scenario's scoring consumers start: the last day of windows is its context.
SCORING_CONTEXT = timedelta(days=1)


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _not_found(exc: client.ApiException) -> bool:
    return bool(exc.status == 404)


@dataclass
class _CachedResolution:
    key: tuple[Any, ...]
    resolved: ResolvedModel | None
    error: ModelResolutionError | None
    at: float


class CityReconciler:
    """The I/O half of the city operator; every decision is delegated to a pure function."""

    def __init__(self, options: OperatorOptions, city: CityOptions) -> None:
        self.options = options
        self.city = city
        configuration = options.target.client_configuration()
        configuration.connection_pool_maxsize = max(8, options.max_workers + 4)
        # Plain JSON by path: the typed API classes would cost more memory than 10,000 watched objects.
        self.kube = KubeRest(client.ApiClient(configuration), options.request_timeout)
        self.local = LocalRayWorkloads(city.city, options.target) if city.workload_mode == "local" else None
        self._models: dict[tuple[str, str], _CachedResolution] = {}
        self.sensor_types = SensorTypeCatalogue(self.kube)
        # A Scenario's open Incidents come from this index, never from listing Incidents.
        self.open_incidents = OpenIncidents()
        self._open_counted: dict[tuple[str, str], int] = {}
        # Alerts never go to the API server this operator talks to (nor to kubernetes.default*).
        self.api_servers = alerts.api_server_endpoints(str(configuration.host))
        # When each fleet's ingest identity was last found in place (fleet uid, monotonic time):
        # a fleet is reconciled at every status its worker writes, its identity once a resync.
        self._identities: dict[tuple[str, str], tuple[str, float]] = {}
        # The data plane: the broker's users follow the fleets (by name: subjects are per city
        # and fleet name), written once every fleet has been listed; streams per fleet spec.
        self.broker: BrokerAdmin | None = None
        self.credentials: Credentials | None = None
        if city.broker is not None:
            self.broker = BrokerAdmin(city.city, city.broker)
            self.credentials = Credentials(city.broker.key(), city.city)
        self._fleet_lock = threading.Lock()
        self._fleet_ids: dict[str, FleetIdentity] = {}
        self._fleets_listed = False
        self._auth_written: str | None = None
        self._streams: dict[str, tuple[Any, ...]] = {}
        self._credentials_made: set[tuple[str, str, str]] = set()  # (namespace, Secret, fleet/scenario uid)
        # Each running Scenario's scoring identity as last made on the broker, by (namespace, name):
        # (its uid, the fleets its consumers are on, when they were last made; None: to be made).
        self._scoring: dict[tuple[str, str], tuple[str, tuple[str, ...], float | None]] = {}

    # -- plumbing ---------------------------------------------------------------------------------
    def forget(self, kind: str, namespace: str, name: str) -> None:
        if kind == "AnalyticsModel":
            self._models.pop((namespace, name), None)
        elif kind == "SensorFleet":
            self._identities.pop((namespace, name), None)
        elif kind == "Scenario":
            self._open_counted.pop((namespace, name), None)

    def load_open_incidents(self) -> None:
        """Fill the open-Incident index from one paged listing of every watched namespace."""
        namespaces: list[str | None] = list(self.options.namespaces) or [None]
        for namespace in namespaces:
            mark = self.open_incidents.mark()
            self.open_incidents.replace(
                namespace, [open_incident_entry(i) for i in self.iter_objects("Incident", namespace)], mark
            )

    def open_count_changed(self, namespace: str, scenario: str) -> bool:
        """Whether the Scenario's open Incidents differ from what its last reconcile counted."""
        return self._open_counted.get((namespace, scenario)) != self.open_incidents.count(namespace, scenario)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        obj = self.kube.get(object_path(API_VERSION, PLURALS[kind], namespace, name))
        return None if obj is None or obj["metadata"].get("deletionTimestamp") else obj

    def list_objects(self, kind: str, namespace: str | None) -> list[dict[str, Any]]:
        return list(self.iter_objects(kind, namespace))

    def iter_objects(self, kind: str, namespace: str | None) -> Iterator[dict[str, Any]]:
        """Every object of ``kind`` in ``namespace`` (None: all), listed in pages."""
        return self.kube.list(object_path(API_VERSION, PLURALS[kind], namespace))

    def write_status(
        self,
        kind: str,
        obj: Mapping[str, Any],
        desired: Mapping[str, Any],
        events: Sequence[tuple[EventReason, str]] = (),
    ) -> bool:
        """Patch the status only where it differs, then post ``events`` (what the change means), or
        else an Event with the Ready condition's reason when Ready flips. True if written."""
        patch = status_patch(obj.get("status"), desired)
        if patch is None:
            return False
        meta = obj["metadata"]
        log.debug("status of %s %s/%s changes: %s", kind, meta["namespace"], meta["name"], patch)
        try:
            self.kube.merge_patch(
                object_path(API_VERSION, PLURALS[kind], meta["namespace"], meta["name"], "status"),
                {"status": patch},
            )
        except client.ApiException as exc:
            if _not_found(exc):
                return False
            raise
        for reason, message in events:
            self.post_event(kind, obj, reason, message)
        before = find_condition(obj.get("status"), "Ready")
        after = find_condition(desired, "Ready")
        if (
            not events
            and before
            and after
            and before.get("status") != after.get("status")
            and not {before.get("reason"), after.get("reason")} & TRANSIENT_REASONS
        ):
            self.post_event(
                kind,
                obj,
                after["reason"],
                after.get("message", ""),
                "Normal" if after["status"] == "True" else "Warning",
            )
        return True

    def post_event(
        self,
        kind: str,
        obj: Mapping[str, Any],
        reason: EventReason | str,
        message: str,
        event_type: str | None = None,
    ) -> None:
        """Post a core/v1 Event on ``obj``; an ``EventReason`` brings its own type."""
        if isinstance(reason, EventReason):
            event_type = event_type or reason.type
            reason = reason.reason
        meta = obj["metadata"]
        now = _now()
        event = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": kind,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": event_type or "Normal",
            "source": {"component": MANAGED_BY},
            "firstTimestamp": rfc3339(now),
            "lastTimestamp": rfc3339(now),
            "count": 1,
        }
        try:
            self.kube.create(object_path("v1", "events", meta["namespace"]), event)
        except client.ApiException as exc:  # an Event is worth a log line, never a failed reconcile
            log.warning(
                "could not post event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], exc.reason
            )

    # -- SensorFleet ------------------------------------------------------------------------------
    def reconcile_fleet(self, namespace: str, name: str) -> None:
        with reconcile_span("SensorFleet", namespace, name):
            fleet = self.get("SensorFleet", namespace, name)
            if fleet is None:
                self._fleet_gone(namespace, name)
                return
            type_name = str(fleet["spec"]["sensorType"])
            lookup = self.sensor_types.lookup(type_name)
            problem = self._ensure_fleet_data_plane(fleet)
            type_spec = self.sensor_types.spec(type_name) if lookup == "found" else None
            if problem is None and lookup == "unreadable":
                problem = ("CatalogueUnreadable", f"The fleet's stream worker is configured with SensorType "
                           f"{type_name}, which the operator may not read; grant it list on "
                           "sensortypes.citynerve.io (the city chart does).")
            deployment = self._read_deployment(namespace, ingest_name(name))
            if problem is None and type_spec is not None and self.city.broker is not None:
                desired = desired_ingest_deployment(fleet, self.city, type_spec, self.city.broker.url)
                deployment = self._ensure_ingest_deployment(fleet, deployment, desired)
            report = None
            if problem is None and self.broker is not None:
                try:
                    report = self.broker.fleet_status(name)
                except Exception as exc:  # noqa: BLE001 - said on the fleet, retried at the next resync
                    problem = ("BrokerUnavailable", f"the city broker did not answer: {_first_line(exc)}")
            self.write_status(
                "SensorFleet", fleet, compute_fleet_status(fleet, deployment, report, _now(), lookup, problem)
            )

    def _ensure_ingest_deployment(
        self, fleet: Mapping[str, Any], deployment: dict[str, Any] | None, desired: dict[str, Any]
    ) -> dict[str, Any] | None:
        namespace, name = fleet["metadata"]["namespace"], fleet["metadata"]["name"]
        if deployment is None:
            return self._create_deployment(namespace, desired)
        if not any(ref.get("uid") == fleet["metadata"]["uid"]
                   for ref in deployment["metadata"].get("ownerReferences") or []):
            log.warning("Deployment %s exists and is not owned by SensorFleet %s; delete or rename it",
                        ingest_name(name), name)
            return deployment
        if deployment_drifted(desired, deployment):
            return self.kube.replace(
                object_path("apps/v1", "deployments", namespace, desired["metadata"]["name"]),
                replacement(desired, deployment),
            )
        return deployment

    def _ensure_fleet_data_plane(self, fleet: Mapping[str, Any]) -> tuple[str, str] | None:
        """The fleet's identity, broker users and streams; a (reason, message) when they cannot be."""
        meta, spec = fleet["metadata"], fleet["spec"]
        if self.broker is None or self.credentials is None:
            return ("NoBroker", "The city operator runs without a broker (--broker-url): the fleet's "
                    "readings have nowhere to go.")
        identity = FleetIdentity(meta["namespace"], meta["name"], meta["uid"], spec.get("protocol", "MQTT"))
        with self._fleet_lock:
            holder = self._fleet_ids.get(identity.name)
            if holder is not None and holder.namespace != identity.namespace:
                return ("FleetNameTaken", f"SensorFleet {identity.name} of namespace {holder.namespace} "
                        "holds this name in the city's data plane (subjects are per city and fleet name); "
                        "rename one.")
            self._fleet_ids[identity.name] = identity
        self._ensure_ingest_identity(fleet, identity)
        try:
            self._sync_broker_auth()
        except client.ApiException as exc:
            return ("BrokerAuthNotWritten",
                    f"Secret {AUTH_SECRET} could not be written: {exc.status} {exc.reason}")
        wanted = (meta["uid"], spec.get("windowSeconds"), spec.get("allowedLatenessSeconds"),
                  spec.get("historyRetentionDays"))
        checked = self._streams.get(identity.name)
        if checked is None or checked[:-1] != wanted or (
            time.monotonic() - checked[-1] > self.city.resync_seconds
        ):
            try:
                self.broker.ensure_fleet(identity.name, spec)
            except Exception as exc:  # noqa: BLE001 - an unreachable or refusing broker is the fleet's condition
                self._streams.pop(identity.name, None)
                return ("BrokerUnavailable", f"The fleet's streams on the city broker could not be made: "
                        f"{_first_line(exc)}")
            self._streams[identity.name] = (*wanted, time.monotonic())
        return None

    def _ensure_ingest_identity(self, fleet: Mapping[str, Any], identity: FleetIdentity) -> None:
        """The fleet's ServiceAccount, broker credentials and (HTTP fleets) Service, checked at most
        once per resync period. Credentials are created, never read back: they derive from the key."""
        key = (identity.namespace, identity.name)
        checked = self._identities.get(key)
        fresh = checked is not None and time.monotonic() - checked[1] < self.city.resync_seconds
        if fresh and checked is not None and checked[0] == identity.uid:
            return
        assert self.credentials is not None
        self._ensure_child(fleet, desired_ingest_service_account(fleet))
        secrets = [desired_fleet_secret(fleet, ingest_secret_name(identity.name),
                                        self.credentials.secret_data("ingest", identity))]
        if identity.protocol == "MQTT":
            secrets.append(desired_fleet_secret(fleet, mqtt_secret_name(identity.name),
                                                self.credentials.secret_data("mqtt", identity)))
        for secret in secrets:
            made = (identity.namespace, secret["metadata"]["name"], identity.uid)
            if made not in self._credentials_made:
                self._create_once(secret)
                self._credentials_made.add(made)
        if identity.protocol == "HTTP":
            self._ensure_child(fleet, desired_ingest_service(fleet))
        self._ensure_claim(fleet, desired_history_claim(fleet, self.city))
        self._identities[key] = (identity.uid, time.monotonic())

    def _ensure_claim(self, fleet: Mapping[str, Any], desired: Mapping[str, Any]) -> None:
        """The fleet's history volume: made when missing, then left as it is (a claim's spec is the
        storage's; resizing is the cluster administrator's)."""
        meta = desired["metadata"]
        path = object_path("v1", "persistentvolumeclaims", meta["namespace"], meta["name"])
        if self.kube.get(path) is None:
            try:
                self.kube.create(object_path("v1", "persistentvolumeclaims", meta["namespace"]), desired)
            except client.ApiException as exc:
                if exc.status != 409:
                    raise
                log.debug("history claim of %s made meanwhile", fleet["metadata"]["name"])

    def _create_once(self, desired: Mapping[str, Any]) -> None:
        """Create a Secret the operator may not read: one that exists is the fleet's already.

        Tried once per fleet (uid) and operator process, so a quiet reconcile writes nothing: a
        credential Secret deleted by hand is made again, the same, when the operator restarts.
        """
        api_version, plural = CHILD_PATHS[desired["kind"]]
        try:
            self.kube.create(object_path(api_version, plural, desired["metadata"]["namespace"]), desired)
        except client.ApiException as exc:
            if exc.status != 409:
                raise

    def load_fleets(self) -> None:
        """Every fleet's identity from one listing; then the broker's users can be written whole."""
        if self.broker is None:
            return
        found: dict[str, FleetIdentity] = {}
        namespaces: list[str | None] = list(self.options.namespaces) or [None]
        listed = [f for ns in namespaces for f in self.iter_objects("SensorFleet", ns)
                  if not f["metadata"].get("deletionTimestamp")]
        for fleet in sorted(listed, key=lambda f: str(f["metadata"].get("creationTimestamp"))):
            meta = fleet["metadata"]
            found.setdefault(meta["name"], FleetIdentity(meta["namespace"], meta["name"], meta["uid"],
                                                         fleet["spec"].get("protocol", "MQTT")))
        with self._fleet_lock:
            self._fleet_ids, self._fleets_listed = found, True
        self._sync_broker_auth()

    def fleet_namespace(self, fleet: str) -> str | None:
        """The namespace of the fleet holding this name in the city's data plane, if any."""
        with self._fleet_lock:
            holder = self._fleet_ids.get(fleet)
        return None if holder is None else holder.namespace

    def _fleet_gone(self, namespace: str, name: str) -> None:
        with self._fleet_lock:
            holder = self._fleet_ids.get(name)
            if holder is None or holder.namespace != namespace:
                return
            del self._fleet_ids[name]
        self._streams.pop(name, None)
        self._sync_broker_auth()
        if self.broker is not None:
            try:
                self.broker.delete_fleet(name)
            except Exception as exc:  # noqa: BLE001 - streams of a deleted fleet are removed at its next delete
                log.warning("SensorFleet %s/%s is gone; its streams could not be removed: %s",
                            namespace, name, _first_line(exc))

    def _sync_broker_auth(self) -> None:
        """Write the broker's users when they changed (and only once every fleet was listed)."""
        if self.credentials is None or self.city.broker is None:
            return
        with self._fleet_lock:
            if not self._fleets_listed:
                return
            text = self.credentials.render(dict(self._fleet_ids))
            if text == self._auth_written:
                return
            data = {AUTH_KEY: base64.b64encode(text.encode()).decode()}
            path = object_path("v1", "secrets", self.city.broker.namespace, AUTH_SECRET)
            try:
                self.kube.merge_patch(path, {"data": data})
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
                body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                        "metadata": {"name": AUTH_SECRET, "namespace": self.city.broker.namespace,
                                     "labels": {LABEL_MANAGED_BY: MANAGED_BY}},
                        "data": data}
                self.kube.create(object_path("v1", "secrets", self.city.broker.namespace), body)
            self._auth_written = text

    def _ensure_child(self, fleet: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any] | None:
        """Create ``desired`` or bring the object of its name back in line with it; the object seen.

        One read, and a write only when something differs; an object of that name that is not
        the fleet's is left alone and logged, as a foreign Deployment is.
        """
        api_version, plural = CHILD_PATHS[desired["kind"]]
        namespace, name = desired["metadata"]["namespace"], desired["metadata"]["name"]
        path = object_path(api_version, plural, namespace, name)
        observed = self.kube.get(path)
        if observed is None:
            try:
                return self.kube.create(object_path(api_version, plural, namespace), desired)
            except client.ApiException as exc:
                if exc.status != 409:  # 409: made by a concurrent reconcile; compared next pass
                    raise
                return self.kube.get(path)
        conflict = child_conflict(desired, observed)
        if conflict is not None:
            log.warning("SensorFleet %s/%s: %s", namespace, fleet["metadata"]["name"], conflict)
            return observed
        patch = child_patch(desired, observed)
        return observed if patch is None else self.kube.merge_patch(path, patch)

    def _read_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.kube.get(object_path("apps/v1", "deployments", namespace, name))

    def _create_deployment(self, namespace: str, desired: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return self.kube.create(object_path("apps/v1", "deployments", namespace), desired)
        except client.ApiException as exc:
            if exc.status == 409:  # made by a concurrent reconcile; the next pass compares it
                return self._read_deployment(namespace, desired["metadata"]["name"])
            raise

    # -- AnalyticsModel ---------------------------------------------------------------------------
    def reconcile_model(self, namespace: str, name: str) -> None:
        with reconcile_span("AnalyticsModel", namespace, name):
            model = self.get("AnalyticsModel", namespace, name)
            if model is None:
                return
            resolved, error = self._resolve(namespace, name, model["spec"])
            self.write_status("AnalyticsModel", model, compute_model_status(model, resolved, error, _now()))

    def _resolve(
        self, namespace: str, name: str, spec: Mapping[str, Any]
    ) -> tuple[ResolvedModel | None, ModelResolutionError | None]:
        key = (
            spec["registeredModel"],
            spec.get("alias"),
            spec.get("version"),
            spec.get("expectedDigest"),
            self.city.mlflow_url,
        )
        cached = self._models.get((namespace, name))
        if cached and cached.key == key and time.monotonic() - cached.at < self.city.model_cache_seconds:
            return cached.resolved, cached.error
        resolved: ResolvedModel | None = None
        error: ModelResolutionError | None = None
        if not self.city.mlflow_url:
            error = ModelResolutionError(
                "RegistryNotConfigured", "the city operator was started without --mlflow-url"
            )
        else:
            try:
                resolved = resolve_model_version(
                    self.city.mlflow_url,
                    spec["registeredModel"],
                    alias=spec.get("alias"),
                    version=spec.get("version"),
                    expected_digest=spec.get("expectedDigest"),
                )
            except ModelResolutionError as exc:
                error = exc
        self._models[(namespace, name)] = _CachedResolution(key, resolved, error, time.monotonic())
        return resolved, error

    # -- Scenario ---------------------------------------------------------------------------------
    def reconcile_scenario(self, namespace: str, name: str) -> None:
        with reconcile_span("Scenario", namespace, name):
            open_incidents = self.open_incidents.count(namespace, name)
            self._open_counted[(namespace, name)] = open_incidents
            scenario = self.get("Scenario", namespace, name)
            if scenario is None:
                self._stop_workloads(namespace, name, keep=None)
                self._drop_scoring(namespace, name)
                return
            fleets = {f["metadata"]["name"]: f for f in self.list_objects("SensorFleet", namespace)}
            models = {m["metadata"]["name"]: m for m in self.list_objects("AnalyticsModel", namespace)}
            unmet = missing_references(scenario, fleets, models)
            workload: WorkloadObservation | None = None
            payload: dict[str, Any] = {}
            if unmet is None and int(scenario["spec"].get("replicas", 1)) > 0:
                payload = scenario_payload(scenario, fleets, models, self.city.city, self.city.mlflow_url)
                revision = workload_revision(payload)
                live = payload["spec"]["mode"] == "live"  # a drill reads no windows
                access = self._ensure_scoring(scenario, payload) if live else None
                if not live:
                    self._drop_scoring(namespace, name)
                if self.local is not None:
                    workload = self.local.ensure(
                        namespace, name, revision, payload, int(payload["spec"]["replicas"]), access=access
                    )
                else:
                    if access is not None:
                        self._ensure_scoring_secret(scenario, access)
                    workload = self._ensure_rayjob(scenario, payload)
                # a live scenario's one local actor is reconfigured in place, not replaced
                keep = LIVE if live and self.local is not None else revision
                self._stop_workloads(namespace, name, keep=keep)
            else:
                self._stop_workloads(namespace, name, keep=None)
                self._drop_scoring(namespace, name)
            refused = [
                check.refusal
                for route in scenario["spec"].get("alertRoutes") or []
                if (check := alerts.check_route(route, self.city.alert_policy, self.api_servers)).refusal
            ]
            refused += [
                refusal
                for route in scenario["spec"].get("alertRoutes") or []
                if (refusal := alerts.secret_refusal(route, self.city.alert_secrets))
            ]
            desired = compute_scenario_status(
                scenario, unmet, workload, open_incidents, _now(), refused, running_models(payload)
            )
            self.write_status("Scenario", scenario, desired, scenario_events(scenario, desired))

    def _ensure_scoring(
        self, scenario: Mapping[str, Any], payload: Mapping[str, Any]
    ) -> ScoringAccess | None:
        """The Scenario's scoring identity on the city broker and its consumers on its fleets'
        windows streams (made again when its fleets change, checked once a resync period); None
        without a broker. A broker that refuses is logged and tried again at the next reconcile:
        the workload then retries its connection until its identity is there."""
        if self.broker is None or self.credentials is None or self.city.broker is None:
            return None
        meta = scenario["metadata"]
        key, uid = (meta["namespace"], meta["name"]), str(payload["scenario"]["uid"])
        consumer = scoring_identity(uid)
        known = self._scoring.get(key)
        if known is not None and known[0] != uid:  # deleted and made again while no event said so
            self._drop_scoring(*key)
            known = None
        with self._fleet_lock:
            self.credentials.scenarios[uid] = ScenarioIdentity(
                meta["namespace"], uid, tuple(f["fleet"] for f in payload["fleets"]))
            fleets = self.credentials.scoring_fleets(uid, self._fleet_ids)
        self._sync_broker_auth()
        checked = None if known is None or known[1] != fleets else known[2]
        if checked is None or time.monotonic() - checked > self.city.resync_seconds:
            created = parse_time(meta.get("creationTimestamp")) or _now()
            unbound = sorted(set(known[1]) - set(fleets)) if known is not None else []
            try:
                self.broker.ensure_scoring(fleets, consumer, created - SCORING_CONTEXT)
                if unbound:
                    self.broker.delete_scoring(unbound, consumer)
            except Exception as exc:  # noqa: BLE001 - retried at the next reconcile of the Scenario
                log.warning("Scenario %s/%s: its consumers on the city broker could not be made: %s",
                            *key, _first_line(exc))
                self._scoring[key] = (uid, tuple(sorted({*fleets, *unbound})), None)
            else:
                self._scoring[key] = (uid, fleets, time.monotonic())
        return ScoringAccess(url=self.city.broker.url, user=consumer,
                             password=self.credentials.password("scoring", uid), consumer=consumer,
                             fleets=fleets)

    def _ensure_scoring_secret(self, scenario: Mapping[str, Any], access: ScoringAccess) -> None:
        """The Secret the Scenario's RayJob reads its broker credential from: created once per
        Scenario (uid) and operator process, never read back (the password derives from the key)."""
        meta = scenario["metadata"]
        name = scoring_secret_name(meta["name"])
        made = (meta["namespace"], name, str(meta["uid"]))
        if made in self._credentials_made:
            return
        plain = {USERNAME_KEY: access.user, PASSWORD_KEY: access.password}
        self._create_once({
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": meta["namespace"],
                         "labels": {LABEL_MANAGED_BY: MANAGED_BY, LABEL_SCENARIO: meta["name"]},
                         "ownerReferences": [owner_reference(scenario)]},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in plain.items()},
        })
        self._credentials_made.add(made)

    def _drop_scoring(self, namespace: str, name: str) -> None:
        """A Scenario whose workload no longer runs: its identity leaves the broker, then its consumers."""
        known = self._scoring.pop((namespace, name), None)
        if known is None or self.credentials is None:
            return
        uid, fleets, _ = known
        with self._fleet_lock:
            self.credentials.scenarios.pop(uid, None)
        self._sync_broker_auth()
        if self.broker is None:
            return
        try:
            self.broker.delete_scoring(fleets, scoring_identity(uid))
        except Exception as exc:  # noqa: BLE001 - a consumer nobody may read costs the broker little
            log.warning("Scenario %s/%s: its consumers on the city broker could not be removed: %s",
                        namespace, name, _first_line(exc))

    def _ensure_rayjob(self, scenario: Mapping[str, Any], payload: Mapping[str, Any]) -> WorkloadObservation:
        desired = desired_rayjob(scenario, payload, self.city)
        namespace, job_name = desired["metadata"]["namespace"], desired["metadata"]["name"]
        path = object_path("ray.io/v1", "rayjobs", namespace, job_name)
        observed = self.kube.get(path)
        if observed is None:
            try:
                observed = self.kube.create(object_path("ray.io/v1", "rayjobs", namespace), desired)
            except client.ApiException as exc:
                if exc.status != 409:
                    raise
                observed = self.kube.request("GET", path)  # made by a concurrent reconcile
        elif drifted(desired["spec"], observed.get("spec")) or drifted(
            desired["metadata"]["labels"], observed["metadata"].get("labels") or {}
        ):
            observed = self.kube.replace(path, replacement(desired, observed))
        return rayjob_observation(observed)

    def _stop_workloads(self, namespace: str, scenario: str, keep: str | None) -> None:
        if self.local is not None:
            if self.local.started or keep is not None:
                self.local.stop(namespace, scenario, keep_revision=keep)
            return
        selector = f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_SCENARIO}={scenario}"
        for job in self.kube.list(object_path("ray.io/v1", "rayjobs", namespace), labelSelector=selector):
            revision = job["metadata"].get("labels", {}).get("citynerve.io/workload-revision")
            if keep is None or revision != keep:
                self.kube.delete(object_path("ray.io/v1", "rayjobs", namespace, job["metadata"]["name"]))

    def scenarios_referencing(
        self,
        namespace: str,
        *,
        fleet: str | None = None,
        model: str | None = None,
    ) -> list[str]:
        """Scenarios in ``namespace`` that read ``fleet`` or score with ``model``."""
        names = []
        for item in self.list_objects("Scenario", namespace):
            spec = item["spec"]
            if (fleet and any(f["name"] == fleet for f in spec.get("fleets") or [])) or (
                model and any(m["name"] == model for m in spec.get("models") or [])
            ):
                names.append(item["metadata"]["name"])
        return names

    # -- Incident ---------------------------------------------------------------------------------
    def reconcile_incident(self, namespace: str, name: str) -> float | None:
        """Deliver the alerts due and record failures; returns the seconds until a retry is due, if any."""
        # Alerts are side effects: they are decided on a fresh read, and the work queue gives one
        # Incident to one worker at a time, so nothing posts again what a reconcile just posted.
        incident = self.get("Incident", namespace, name)
        if incident is None:
            return None
        # An Incident is reconciled inside the trace of the detection that raised it.
        with reconcile_span("Incident", namespace, name, incident["metadata"].get("annotations")):
            record_incident_transitions(incident)
            detected = incident_detected_message(incident)
            if detected is not None:
                self.post_event("Incident", incident, INCIDENT_DETECTED, detected)
            scenario = self.get("Scenario", namespace, incident["spec"]["scenarioRef"]["name"])
            routes = list((scenario or {}).get("spec", {}).get("alertRoutes") or [])
            notified = list((incident.get("status") or {}).get("notifiedRoutes") or [])
            retries = alerts.stored_retries(incident, routes)
            for delivery in alerts.deliveries_due(incident["spec"], routes, notified, retries, _now()):
                try:
                    self._deliver(incident, delivery)
                except alerts.AlertDeliveryError as exc:
                    # Timed after the attempt: a slow receiver's next attempt is a full backoff later.
                    retries = alerts.record_failure(
                        retries, delivery, exc, _now(),
                        self.city.alert_retry_seconds, self.city.alert_retry_max_seconds,
                    )
                    failure = retries[delivery.route_name]
                    log.warning("%s/%s: %s", namespace, name, failure.message)
                    self.post_event("Incident", incident, ALERT_FAILED, alerts.failure_event_message(failure))
                    continue
                retries = {k: v for k, v in retries.items() if k != delivery.route_name}
                notified = alerts.record_delivery(notified, delivery)
                delivered = alerts.delivered_event_message(delivery)
                self.post_event("Incident", incident, ALERT_DELIVERED, delivered)
            now = _now()
            self.write_status(
                "Incident", incident,
                compute_incident_status(incident, notified, alerts.retries_status(retries), now),
            )
            return alerts.seconds_to_next_retry(retries.values(), now)

    def _deliver(self, incident: Mapping[str, Any], delivery: alerts.Delivery) -> None:
        """One signed delivery to one route, to an address the alert policy allows."""
        route = delivery.route
        namespace = incident["metadata"]["namespace"]
        # Before any request: the operator reads only the Secrets the city chart lists (its RBAC).
        refusal = alerts.secret_refusal(route, self.city.alert_secrets)
        if refusal is not None:
            raise alerts.AlertDeliveryError("SecretNotAllowed", refusal)
        check = alerts.check_route(route, self.city.alert_policy, self.api_servers)
        if check.refusal is not None:
            raise alerts.AlertDeliveryError("RouteRefused", check.refusal)
        if check.unresolved is not None:
            raise alerts.AlertDeliveryError(
                "ReceiverUnreachable",
                f"alert route {route['name']} ({alerts.display_url(route['url'])}): {check.unresolved}; "
                "check the route's url",
            )
        ref = route["secretRef"]
        try:
            secret = self.kube.request("GET", object_path("v1", "secrets", namespace, ref["name"]))
        except client.ApiException as exc:
            raise alerts.AlertDeliveryError(
                "SecretNotFound" if _not_found(exc) else "SecretUnreadable",
                f"alert route {route['name']}: Secret {ref['name']} in {namespace} could not "
                f"be read ({exc.status} {exc.reason}); create it with key {ref['key']}",
            ) from exc
        encoded = (secret.get("data") or {}).get(ref["key"])
        if encoded is None:
            raise alerts.AlertDeliveryError(
                "SecretKeyNotFound",
                f"alert route {route['name']}: Secret {ref['name']} has no key {ref['key']}",
            )
        body = alerts.alert_body(incident, delivery.state, self.city.city)
        with webhook_span(route["name"], route["url"], delivery.state) as headers:
            alerts.post_alert(
                route["name"], route["url"], check.addresses, base64.b64decode(encoded), body,
                delivery.delivery_id(str(incident["metadata"].get("uid"))),
                self.city.webhook_timeout_seconds, headers,
            )

    # -- periodic resync --------------------------------------------------------------------------
    def resync(self, enqueue: Callable[[tuple[str, str, str]], None]) -> None:
        """Queue what changes without an event (moved aliases, stale data, retries due); sweep orphans.

        Fleets, models and scenarios are few and are all queued. Incidents can be many: one
        listing in pages, and only those with an alert due or a status to correct (decided on
        the listed copy) are queued, so a quiet pass over 10,000 Incidents costs a few list
        requests and no per-object reads. The listing also rebuilds the open-Incident index.
        """
        namespaces: list[str | None] = list(self.options.namespaces) or [None]
        self.sensor_types.refresh()  # before the fleets are queued: a type that came or went is seen
        self.load_fleets()  # a fleet deleted while no event came leaves the broker's users here
        existing: set[tuple[str, str]] = set()
        scoring: set[str] = set()  # the consumers of the live Scenarios that exist
        for namespace in namespaces:
            routes: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for kind in ("SensorFleet", "AnalyticsModel", "Scenario"):
                for item in self.iter_objects(kind, namespace):
                    meta = item["metadata"]
                    if kind == "Scenario":
                        existing.add((meta["namespace"], meta["name"]))
                        if item["spec"].get("mode", "live") == "live" and meta.get("uid"):
                            scoring.add(scoring_identity(str(meta["uid"])))
                        routes[(meta["namespace"], meta["name"])] = item["spec"].get("alertRoutes") or []
                    if not meta.get("deletionTimestamp"):
                        enqueue((kind, meta["namespace"], meta["name"]))
            mark, listed = self.open_incidents.mark(), []
            for item in self.iter_objects("Incident", namespace):
                listed.append(open_incident_entry(item))
                meta = item["metadata"]
                scenario = (meta["namespace"], item["spec"]["scenarioRef"]["name"])
                if not meta.get("deletionTimestamp") and alerts.incident_needs_reconcile(
                    item, routes.get(scenario, []), _now()
                ):
                    enqueue(("Incident", meta["namespace"], meta["name"]))
            self.open_incidents.replace(namespace, listed, mark)  # catches deletions no event reported
        if self.local is not None and self.local.started:
            watched = set(self.options.namespaces)
            self.local.sweep(existing, lambda ns: not watched or ns in watched)
        self._sweep_scoring(scoring)

    def _sweep_scoring(self, live: set[str]) -> None:
        """Remove consumers of Scenarios that are gone (deleted while the operator was down, or whose
        removal failed): a consumer of a live Scenario that exists, or that this operator has just
        registered, is kept."""
        if self.broker is None or self.credentials is None:
            return
        try:
            listed = self.broker.scoring_consumers(sorted(self._fleet_ids))
            with self._fleet_lock:
                live = live | {scoring_identity(uid) for uid in self.credentials.scenarios}
            for fleet, consumers in orphan_consumers(listed, live).items():
                for consumer in consumers:
                    log.info("fleet %s: removing consumer %s, whose Scenario is gone", fleet, consumer)
                    self.broker.delete_scoring([fleet], consumer)
        except Exception as exc:  # noqa: BLE001 - tried again at the next resync
            log.warning("the Scenarios' consumers on the city broker could not be swept: %s",
                        _first_line(exc))


def orphan_consumers(listed: Mapping[str, Sequence[str]], live: set[str]) -> dict[str, list[str]]:
    """Per fleet, the scoring consumers listed on its windows stream that no live Scenario owns (pure)."""
    return {fleet: [c for c in consumers if c not in live]
            for fleet, consumers in listed.items() if any(c not in live for c in consumers)}


class SensorTypeCatalogue:
    """Names of the SensorTypes in the city (cluster-scoped, applied by the agent from the hub).

    Listed at every resync, which then queues every fleet; a name not in the last listing is
    looked up at once, so a fleet whose SensorType just arrived is Ready at its next reconcile,
    and a missing type costs one read per reconcile of its fleet. An operator whose account may
    not list SensorTypes says so on each fleet (``unreadable``) instead of guessing.
    """

    def __init__(self, kube: KubeRest) -> None:
        self.kube = kube
        self._lock = threading.Lock()
        self._specs: dict[str, dict[str, Any]] = {}  # by name: a fleet's workers are configured with it
        self._forbidden = False

    def _list(self, **query: Any) -> dict[str, dict[str, Any]]:
        listed = self.kube.list(object_path(API_VERSION, "sensortypes"), **query)
        return {item["metadata"]["name"]: item.get("spec") or {} for item in listed}

    def _refused(self, exc: client.ApiException) -> None:
        """Remember that listing SensorTypes is forbidden (said once, and on every fleet's condition)."""
        if exc.status != 403:
            raise exc
        if not self._forbidden:
            log.warning("The city operator may not list SensorTypes (%s): fleets unchecked.", exc.reason)
        self._forbidden = True

    def refresh(self) -> None:
        try:
            specs = self._list()
        except client.ApiException as exc:
            self._refused(exc)
            return
        with self._lock:
            self._specs, self._forbidden = specs, False

    def lookup(self, name: str) -> SensorTypeLookup:
        with self._lock:
            if name in self._specs:
                return "found"
            if self._forbidden:  # asked again at the next resync, not at every reconcile
                return "unreadable"
        try:
            found = self._list(fieldSelector=f"metadata.name={name}")
        except client.ApiException as exc:
            self._refused(exc)
            return "unreadable"
        if name in found:
            with self._lock:
                self._specs[name] = found[name]
        return "found" if name in found else "missing"

    def spec(self, name: str) -> dict[str, Any] | None:
        """The spec of a type ``lookup`` found (as of the last listing or lookup)."""
        with self._lock:
            return self._specs.get(name)


class OpenIncidents:
    """Open Incidents by (namespace, scenario): kept from Incident events, rebuilt from listings.

    A few bytes per open Incident, so a Scenario's count never needs a listing of Incidents. A
    rebuild from a listing is applied only if no event arrived while it was being listed (an
    event is always at least as new as the listing); otherwise the next listing tries again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str], set[str]] = {}
        self._events = 0

    def observe(self, namespace: str, name: str, spec: Mapping[str, Any], *, deleted: bool) -> str:
        """Record an Incident event; returns the name of the Scenario it belongs to."""
        scenario = str(spec.get("scenarioRef", {}).get("name") or "")
        with self._lock:
            self._events += 1
            names = self._open.setdefault((namespace, scenario), set())
            if deleted or spec.get("state") == "Resolved":
                names.discard(name)
                if not names:
                    del self._open[(namespace, scenario)]
            else:
                names.add(name)
        return scenario

    def count(self, namespace: str, scenario: str) -> int:
        with self._lock:
            return len(self._open.get((namespace, scenario), ()))

    def mark(self) -> int:
        """Taken before a listing starts; ``replace`` compares it."""
        with self._lock:
            return self._events

    def replace(self, namespace: str | None, entries: list[tuple[str, str, str] | None], mark: int) -> bool:
        """Replace what is known of ``namespace`` (None: all) with a listing's open entries."""
        rebuilt: dict[tuple[str, str], set[str]] = {}
        for entry in entries:
            if entry is not None:
                rebuilt.setdefault(entry[:2], set()).add(entry[2])
        with self._lock:
            if self._events != mark:
                return False
            kept = {k: v for k, v in self._open.items() if namespace is not None and k[0] != namespace}
            self._open = {**kept, **rebuilt}
            return True


def open_incident_entry(incident: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """(namespace, scenario, name) of an open Incident; None for a resolved or deleted one (pure)."""
    meta, spec = incident["metadata"], incident["spec"]
    if spec.get("state") == "Resolved" or meta.get("deletionTimestamp"):
        return None
    return meta["namespace"], str(spec.get("scenarioRef", {}).get("name") or ""), meta["name"]


def rayjob_observation(job: Mapping[str, Any]) -> WorkloadObservation:
    """What a RayJob's status says about the scenario's workload (pure)."""
    status = job.get("status") or {}
    deployment = status.get("jobDeploymentStatus") or ""
    job_status = status.get("jobStatus") or ""
    if deployment == "Failed" or job_status in ("FAILED", "STOPPED"):
        state = "Failed"
    elif deployment == "Complete" and job_status == "SUCCEEDED":
        state = "Succeeded"
    elif deployment == "Running":
        state = "Running"
    else:
        state = "Pending"
    cluster = status.get("rayClusterStatus") or {}
    message = str(
        status.get("message")
        or (
            f"jobDeploymentStatus {deployment}" if deployment else "not yet picked up by the KubeRay operator"
        )
    )
    return WorkloadObservation(
        "ray.io/v1",
        "RayJob",
        job["metadata"]["name"],
        state,  # type: ignore[arg-type]
        ready_replicas=int(cluster.get("readyWorkerReplicas") or cluster.get("availableWorkerReplicas") or 0),
        message=message,
    )
