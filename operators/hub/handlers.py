"""The hub operator: onboarding, propagation, reachability and roll-up.

Handlers are thin: they gather what Kopf's indices already hold and hand it to the pure
functions in ``federation.placement``, ``federation.onboarding`` and ``hub.status``; they
write only the differences those functions name.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import kopf
from citynerve.observability import propagation_stamp, reconcile_span, record_city_health
from citynerve.operators.conditions import parse_time
from citynerve.operators.federation import onboarding
from citynerve.operators.federation.placement import (
    AGENT_LEASE,
    REPORT_CONFIGMAP,
    WORK_HASH_ANNOTATION,
    WORK_LABEL,
    city_namespace,
    desired_work,
    is_joined,
    work_changes,
)
from citynerve.operators.hub.promotion import city_pins, register_promotion_handlers
from citynerve.operators.hub.status import (
    city_status,
    federated_scenario_status,
    lifecycle_events,
    read_report,
    sensor_type_status,
    status_changes,
)
from citynerve.operators.kube import Kube
from citynerve.operators.runtime import OperatorOptions, new_registry
from kubernetes import client

GROUP, VERSION = "citynerve.io", "v1alpha1"
log = logging.getLogger(__name__)


def _plain(body: Mapping[str, Any]) -> dict[str, Any]:
    """A Kopf body as a plain dict (indices keep them past the handler's lifetime)."""
    return {"metadata": dict(body.get("metadata", {})), "spec": dict(body.get("spec", {})),
            "status": dict(body.get("status", {}) or {}),
            "apiVersion": body.get("apiVersion"), "kind": body.get("kind")}


class HubContext:
    """What the handlers share: API clients and how often to check on cities."""

    def __init__(self, options: OperatorOptions, check_interval: float = 2.0,
                 mlflow_url: str | None = None, mlflow_users: Path | None = None) -> None:
        self.api_client = client.ApiClient(options.target.client_configuration())
        self.kube = Kube(self.api_client)
        self.core = client.CoreV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)
        self.certificates = client.CertificatesV1Api(self.api_client)
        self.check_interval = check_interval
        # Model promotion (models engineer): the registry whose versions, metrics and aliases
        # promotions read and move; MLflow's own variable when not given.
        self.mlflow_url = mlflow_url or os.environ.get("MLFLOW_TRACKING_URI")
        # The registry identities this operator (MLflow's admin) keeps: a folder of files named
        # by user, each holding its password (the hub chart mounts them from a Secret).
        self.mlflow_users = mlflow_users
        # What this operator wrote, by (namespace, name) → work hash (None: deleted). The work
        # index catches up with our own writes a moment later; until it does, this keeps a
        # burst of changes from writing the same ConfigMap twice.
        self.written: dict[tuple[str, str], str | None] = {}
        # One writer at a time, and each reads the indices while holding it: a handler that was
        # waiting must not write a picture older than the last one written (work it never saw
        # would be deleted, and the city's agent would delete what that work had applied).
        self.lock = threading.RLock()
        self._own_account: tuple[str, str] | bool | None = False  # False: not asked yet
        # The SensorType statuses this operator wrote last, by name (the index catches up later).
        self.sensor_type_status: dict[tuple[str, str], dict[str, Any]] = {}

    def own_account(self) -> tuple[str, str] | None:
        """(namespace, name) of the ServiceAccount this operator runs as; None if it is no account.

        Asked of the API server (SelfSubjectReview), so the chart needs to tell it nothing.
        """
        if self._own_account is False:
            review = client.AuthenticationV1Api(self.api_client).create_self_subject_review(
                {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
            parts = str(review.status.user_info.username or "").split(":")
            is_account = len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]
            self._own_account = (parts[2], parts[3]) if is_account else None
        return self._own_account if isinstance(self._own_account, tuple) else None


class Indices:
    """The hub's in-memory picture, as Kopf hands its indices to a handler (by keyword)."""

    def __init__(self, kwargs: Mapping[str, Any]) -> None:
        self.city: kopf.Index[str, dict[str, Any]] = kwargs["city_index"]
        self.sensortype: kopf.Index[str, dict[str, Any]] = kwargs["sensortype_index"]
        self.federated_scenario: kopf.Index[str, dict[str, Any]] = kwargs["federated_index"]
        self.work: kopf.Index[str, dict[str, Any]] = kwargs["work_index"]
        self.report: kopf.Index[str, dict[str, Any]] = kwargs["report_index"]
        self.lease: kopf.Index[str, dict[str, Any]] = kwargs["lease_index"]
        self.promotion: kopf.Index[str, dict[str, Any]] = kwargs["promotion_index"]

    @staticmethod
    def _values(index: kopf.Index[str, dict[str, Any]]) -> list[dict[str, Any]]:
        return [v for _, store in index.items() for v in store]

    @staticmethod
    def first(index: kopf.Index[str, dict[str, Any]], key: str) -> dict[str, Any] | None:
        return next(iter(index.get(key, [])), None)

    def cities(self) -> list[dict[str, Any]]:
        return self._values(self.city)

    def sensor_types(self) -> list[dict[str, Any]]:
        return self._values(self.sensortype)

    def federated(self) -> list[dict[str, Any]]:
        return self._values(self.federated_scenario)

    def promotions(self) -> list[dict[str, Any]]:
        return self._values(self.promotion)

    def reports(self, cities: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        """Each city's agent report, by city name (empty for a city that has not reported)."""
        names = [c["metadata"]["name"] for c in cities]
        return {name: read_report(self.first(self.report, city_namespace(name))) for name in names}


def sync_city_work(ctx: HubContext, city: Mapping[str, Any], sensor_types: Iterable[Mapping[str, Any]],
                   federated: Iterable[Mapping[str, Any]], cities: Iterable[Mapping[str, Any]],
                   observed: Mapping[str, Mapping[str, Any]],
                   promotions: Iterable[Mapping[str, Any]] = ()) -> int:
    """Write the differences between a city's desired and observed work; returns writes made."""
    name = city["metadata"]["name"]
    desired = desired_work(city, sensor_types, federated, cities, city_pins(name, promotions))
    if not is_joined(city):
        return 0
    ns = city_namespace(name)
    with ctx.lock:
        return _write_work(ctx, ns, desired, observed)


def _write_work(ctx: HubContext, ns: str, desired: Mapping[str, Mapping[str, Any]],
                indexed: Mapping[str, Mapping[str, Any]]) -> int:
    observed = dict(indexed)
    for (written_ns, cm_name), work_hash in ctx.written.items():
        if written_ns != ns:
            continue
        if work_hash is None:
            observed.pop(cm_name, None)
        else:
            observed[cm_name] = {"metadata": {"annotations": {WORK_HASH_ANNOTATION: work_hash}}}
    create, update, delete = work_changes(desired, observed)
    for cm in (*create, *update):
        # The write time rides along (outside the hash) so the agent can measure propagation.
        cm["metadata"]["annotations"].update(propagation_stamp())
    for cm in create:
        try:
            ctx.core.create_namespaced_config_map(ns, cm)
        except client.ApiException as exc:
            if exc.status != 409:
                raise
            ctx.core.replace_namespaced_config_map(cm["metadata"]["name"], ns, cm)
    for cm in update:
        ctx.core.replace_namespaced_config_map(cm["metadata"]["name"], ns, cm)
    for cm_name in delete:
        try:
            ctx.core.delete_namespaced_config_map(cm_name, ns)
        except client.ApiException as exc:
            if exc.status != 404:
                raise
    for cm in (*create, *update):
        ctx.written[(ns, cm["metadata"]["name"])] = cm["metadata"]["annotations"][WORK_HASH_ANNOTATION]
    for cm_name in delete:
        ctx.written[(ns, cm_name)] = None
    # Entries the index has caught up with are dropped, so the cache stays small.
    for cm_name, seen in indexed.items():
        mark = ctx.written.get((ns, cm_name))
        if mark is not None and mark == (seen["metadata"].get("annotations") or {}).get(WORK_HASH_ANNOTATION):
            del ctx.written[(ns, cm_name)]
    for (written_ns, cm_name), mark in list(ctx.written.items()):
        if written_ns == ns and mark is None and cm_name not in indexed:
            del ctx.written[(written_ns, cm_name)]
    if create or update or delete:
        log.info("%s: work +%d ~%d -%d", ns, len(create), len(update), len(delete))
    return len(create) + len(update) + len(delete)


def build_registry(options: OperatorOptions, check_interval: float = 2.0,
                   mlflow_url: str | None = None, mlflow_users: Path | None = None) -> kopf.OperatorRegistry:
    """Every hub handler, registered into a registry of its own."""
    registry = new_registry(options)
    ctx = HubContext(options, check_interval, mlflow_url, mlflow_users)

    # -- indices: the hub's in-memory picture, kept current by watches ---------------------
    @kopf.index(GROUP, VERSION, "cities", id="city_index", registry=registry)
    def city_index(*, name: str, body: kopf.Body, **_: Any) -> dict[str, Any]:
        return {name: _plain(body)}

    @kopf.index(GROUP, VERSION, "sensortypes", id="sensortype_index", registry=registry)
    def sensortype_index(*, name: str, body: kopf.Body, **_: Any) -> dict[str, Any]:
        return {name: _plain(body)}

    @kopf.index(GROUP, VERSION, "federatedscenarios", id="federated_index", registry=registry)
    def federated_index(*, namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[str, Any]:
        return {f"{namespace}/{name}": _plain(body)}

    @kopf.index("configmaps", labels={WORK_LABEL: "true"}, id="work_index", registry=registry)
    def work_index(*, namespace: str | None, name: str, meta: kopf.Meta, **_: Any) -> dict[str, Any]:
        return {namespace or "": {"metadata": {"name": name, "annotations": dict(meta.annotations)}}}

    @kopf.index("configmaps", field="metadata.name", value=REPORT_CONFIGMAP, id="report_index",
                registry=registry)
    def report_index(*, namespace: str | None, body: kopf.Body, **_: Any) -> dict[str, Any]:
        return {namespace or "": {"data": dict(body.get("data") or {})}}

    @kopf.index("coordination.k8s.io", "v1", "leases", field="metadata.name", value=AGENT_LEASE,
                id="lease_index", registry=registry)
    def lease_index(*, namespace: str | None, spec: kopf.Spec, **_: Any) -> dict[str, Any]:
        return {namespace or "": {"spec": dict(spec)}}

    # Model promotion (models engineer): promotions pin AnalyticsModels into cities' work.
    @kopf.index(GROUP, VERSION, "modelpromotions", id="promotion_index", registry=registry)
    def promotion_index(*, namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[str, Any]:
        return {f"{namespace}/{name}": _plain(body)}

    def sync_sensor_types(idx: Indices) -> int:
        """Write each SensorType's propagation status where it changed; returns writes made."""
        with ctx.lock:  # handlers run on several threads; one writer at a time
            cities = idx.cities()
            reports = idx.reports(cities)
            now = dt.datetime.now(dt.UTC)
            writes = 0
            types = idx.sensor_types()
            present = {(t["metadata"]["name"], str(t["metadata"].get("uid"))) for t in types}
            for gone in set(ctx.sensor_type_status) - present:  # deleted: nothing to remember
                ctx.sensor_type_status.pop(gone, None)
            for sensor_type in types:
                name = sensor_type["metadata"]["name"]
                key = (name, str(sensor_type["metadata"].get("uid")))  # a recreated one is written afresh
                wanted = sensor_type_status(sensor_type, cities, reports, now)
                changes = status_changes(sensor_type.get("status"), wanted)
                # The index catches up with a write a moment later; until then, do not write it again.
                if not changes or ctx.sensor_type_status.get(key) == wanted:
                    continue
                try:
                    ctx.custom.patch_cluster_custom_object_status(GROUP, VERSION, "sensortypes", name,
                                                                  {"status": changes})
                except client.ApiException as exc:
                    if exc.status != 404:
                        raise
                    continue
                ctx.sensor_type_status[key] = wanted
                writes += 1
            return writes

    def sync(city: Mapping[str, Any], idx: Indices) -> int:
        ns = city_namespace(city["metadata"]["name"])
        with ctx.lock:  # the indices are read under the writers' lock (HubContext.lock)
            observed = {cm["metadata"]["name"]: cm for cm in idx.work.get(ns, [])}
            return sync_city_work(ctx, city, idx.sensor_types(), idx.federated(), idx.cities(), observed,
                                  idx.promotions())

    # -- onboarding -------------------------------------------------------------------------
    @kopf.on.resume(GROUP, VERSION, "cities", registry=registry)
    @kopf.on.create(GROUP, VERSION, "cities", registry=registry)
    @kopf.on.update(GROUP, VERSION, "cities", field="spec.approved", registry=registry)
    @kopf.on.update(GROUP, VERSION, "cities", field="spec.agentKeyFingerprint", registry=registry)
    def city_admit(*, name: str, spec: kopf.Spec, body: kopf.Body, **kwargs: Any) -> None:
        # Only an administrator can have set `approved` (the hub's admission policy refuses
        # anyone else, this operator included), so an approved City is the administrator's word.
        if not spec.get("approved"):
            return
        try:
            for manifest in onboarding.city_access(name, ctx.own_account()):
                ctx.kube.ensure(manifest)
        except client.ApiException as exc:
            if exc.status != 403:
                raise
            # The RoleBinding that lets this operator write in city-<name> was just made; the
            # API server's authorizer sees it a moment later.
            raise kopf.TemporaryError(f"city-{name} access not effective yet: {exc.reason}", delay=1) from exc
        cities = {c["metadata"]["name"]: c for c in Indices(kwargs).cities()}
        cities[name] = _plain(body)
        approve_pending_csrs(ctx, name, cities)

    @kopf.on.event("certificates.k8s.io", "v1", "certificatesigningrequests",
                   labels={onboarding.CSR_CITY_LABEL: kopf.PRESENT}, registry=registry)
    def csr_review(*, body: kopf.Body, **kwargs: Any) -> None:
        cities = {c["metadata"]["name"]: c for c in Indices(kwargs).cities()}
        review_csr(ctx, body, cities)

    # -- propagation ------------------------------------------------------------------------
    @kopf.on.event(GROUP, VERSION, "sensortypes", registry=registry)
    @kopf.on.event(GROUP, VERSION, "federatedscenarios", registry=registry)
    @kopf.on.event(GROUP, VERSION, "modelpromotions", registry=registry)  # pins (models engineer)
    def propagate_to_cities(*, resource: kopf.Resource, name: str, namespace: str | None,
                            **kwargs: Any) -> None:
        idx = Indices(kwargs)
        with reconcile_span(resource.kind or resource.plural, namespace, name):
            for city in idx.cities():
                sync(city, idx)
            if resource.plural == "sensortypes":
                sync_sensor_types(idx)

    @kopf.on.event("configmaps", field="metadata.name", value=REPORT_CONFIGMAP, registry=registry)
    def report_changed(*, namespace: str | None, **kwargs: Any) -> None:
        # An agent applied (or removed) work: which SensorTypes each city holds may have changed.
        with reconcile_span("SensorType", namespace, REPORT_CONFIGMAP):
            sync_sensor_types(Indices(kwargs))

    @kopf.on.event(GROUP, VERSION, "cities", registry=registry)
    def propagate_to_city(*, body: kopf.Body, type: str, **kwargs: Any) -> None:
        if type == "DELETED":
            sync_sensor_types(Indices(kwargs))  # one city fewer to hold them
            return
        # A City's labels decide its placements: its own work may change with them.
        with reconcile_span("City", None, body["metadata"]["name"]):
            sync(_plain(body), Indices(kwargs))

    # -- reachability, readiness and roll-up -------------------------------------------------
    @kopf.timer(GROUP, VERSION, "cities", interval=check_interval, registry=registry)
    def city_check(*, body: kopf.Body, name: str, patch: kopf.Patch, **kwargs: Any) -> None:
        with reconcile_span("City", None, name):
            check_city(body, name, patch, Indices(kwargs))

    def check_city(body: kopf.Body, name: str, patch: kopf.Patch, idx: Indices) -> None:
        ns = city_namespace(name)
        # Periodic consistency: any work written or removed behind the hub's back is put right.
        sync(_plain(body), idx)
        desired = desired_work(_plain(body), idx.sensor_types(), idx.federated(), idx.cities(),
                               city_pins(name, idx.promotions()))
        hashes = {n: cm["metadata"]["annotations"][WORK_HASH_ANNOTATION] for n, cm in desired.items()}
        lease = idx.first(idx.lease, ns)
        report = read_report(idx.first(idx.report, ns))
        now = dt.datetime.now(dt.UTC)
        wanted = city_status(_plain(body), lease, report, hashes, now)
        conditions = wanted["conditions"]
        for key, value in status_changes(body.get("status"), wanted).items():
            patch.status[key] = value
        old_conditions = (body.get("status") or {}).get("conditions") or []
        for type_, reason, message in lifecycle_events(name, old_conditions, conditions):
            # kopf.event, not kopf.info: these are posted whatever the operator's posting level.
            kopf.event(body, type=type_, reason=reason, message=message)
        state = {c["type"]: c["status"] for c in conditions}
        renewed = parse_time((lease or {}).get("spec", {}).get("renewTime"))
        status = body.get("status") or {}
        record_city_health(
            name, reachable=state.get("Reachable") == "True", ready=state.get("Ready") == "True",
            sensors_online=status.get("sensorsOnlineTotal"), open_incidents=status.get("openIncidents"),
            heartbeat_age_s=(now - renewed).total_seconds() if renewed else None)

    @kopf.timer(GROUP, VERSION, "federatedscenarios", interval=check_interval, registry=registry)
    def federated_check(*, body: kopf.Body, patch: kopf.Patch, **kwargs: Any) -> None:
        with reconcile_span("FederatedScenario", body["metadata"].get("namespace"), body["metadata"]["name"]):
            check_federated(body, patch, Indices(kwargs))

    def check_federated(body: kopf.Body, patch: kopf.Patch, idx: Indices) -> None:
        cities = idx.cities()
        reports = idx.reports(cities)
        wanted = federated_scenario_status(_plain(body), cities, reports, dt.datetime.now(dt.UTC))
        for key, value in status_changes(body.get("status"), wanted).items():
            patch.status[key] = value

    register_promotion_handlers(registry, ctx)  # model promotion (models engineer)
    return registry


def review_csr(ctx: HubContext, csr: Mapping[str, Any], cities: Mapping[str, Mapping[str, Any]]) -> None:
    """Approve a city's pending CSR when the pure decision says so; leave it pending otherwise.

    A request for an approved city with another key stays pending and is told on the City (an
    Event): the administrator re-keys, or it was not the city's agent.
    """
    conditions = (csr.get("status") or {}).get("conditions") or []
    if any(c.get("type") in ("Approved", "Denied") for c in conditions):
        return
    name = csr["metadata"]["name"]
    ok, why = onboarding.csr_decision(csr, cities)
    if not ok:
        log.info("CSR %s stays pending: %s", name, why)
        city = ((csr.get("metadata") or {}).get("labels") or {}).get(onboarding.CSR_CITY_LABEL)
        known = cities.get(city or "")
        if known is not None and known.get("spec", {}).get("approved"):
            kopf.warn(kopf.Body(cast("kopf.RawBody", dict(known))), reason="CertificateRequestPending",
                      message=f"Certificate request {name} is not approved: {why}.")
        return
    body = {"status": {"conditions": [{
        "type": "Approved", "status": "True", "reason": "CityApproved", "message": why,
        "lastUpdateTime": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}]}}
    ctx.certificates.patch_certificate_signing_request_approval(name, body)


def approve_pending_csrs(ctx: HubContext, city: str, cities: Mapping[str, Mapping[str, Any]]) -> None:
    pending = ctx.certificates.list_certificate_signing_request(
        label_selector=f"{onboarding.CSR_CITY_LABEL}={city}")
    for item in pending.items:
        review_csr(ctx, ctx.api_client.sanitize_for_serialization(item), cities)
