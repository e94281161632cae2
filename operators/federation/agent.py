"""The city's agent: joins the hub, pulls the city's work, applies it, reports back.

Pull mode (DESIGN.md "Federation"): the agent calls the hub, never the reverse, and holds a
credential for its own hub namespace only. Each cycle it

1. reads its own city (the roll-up of fleets, scenarios and incidents) — if the city's API
   server does not answer, the cycle stops here and no heartbeat is sent: the hub must see
   the city as unreachable, not merely its agent as alive;
2. lists its work on the hub and applies what changed (server-side apply), and deletes in the
   city only what the hub's *complete* list no longer names — a failed or partial read
   deletes nothing;
3. renews its Lease, and writes its report and City status only when they changed;
4. watches its work until the next heartbeat is due, applying changes as they arrive.

Cut off from the hub, the city keeps everything it last applied and keeps detecting;
on reconnection the next cycle brings both sides level.

Run by the city chart, the agent knows its release (namespace, Deployment, ServiceAccount).
Its key Secret and the work it applies in the release namespace are owned by the chart's
ServiceAccount, so ``helm uninstall`` takes them with it (garbage collection). When its own
Deployment is gone — or the chart's permissions to read it, which Helm deletes right after —
the release was uninstalled: the agent tells the hub it left, and stops.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import urllib3
from citynerve.observability import record_incident_counts, record_propagation
from citynerve.operators.city.rbac import IDENTITY_SECRET
from citynerve.operators.conditions import rfc3339
from citynerve.operators.federation import onboarding
from citynerve.operators.federation.placement import (
    AGENT_LEASE,
    PROPAGATED_LABEL,
    REPORT_CONFIGMAP,
    WORK_HASH_ANNOTATION,
    WORK_LABEL,
    city_namespace,
    manifest_of,
)
from citynerve.operators.hub.status import LABELS_KEY, OFFBOARDED_KEY, REPORT_KEY, SCENARIO_KINDS_KEY
from citynerve.operators.kube import Kube
from citynerve.operators.runtime import KubeTarget, scratch_dir, token_kubeconfig
from cryptography import x509
from kubernetes import client, watch

log = logging.getLogger(__name__)
GROUP, VERSION = "citynerve.io", "v1alpha1"
FIELD_MANAGER = "citynerve-agent"
WORK_NAME_ANNOTATION = "citynerve.io/work-name"
AGENT_VERSION = "0.1.0"
_TRANSIENT = (client.ApiException, urllib3.exceptions.HTTPError, OSError, TimeoutError)


@dataclass
class AgentConfig:
    """What a city's agent needs to know; the city chart's values map onto it."""

    city: str
    city_target: KubeTarget
    hub_server: str
    hub_ca_pem: bytes
    bootstrap: KubeTarget
    join_request: dict[str, Any]  # the City manifest to create on the hub (approved: false)
    work_namespace: str = "citynerve"
    heartbeat_seconds: float = 10.0
    scratch: Path = field(default_factory=lambda: scratch_dir("agent"))
    # The city chart's release: where the key Secret lives, and what owns what the agent creates.
    namespace: str = onboarding.SYSTEM_NAMESPACE
    deployment: str | None = None  # None: not run by a chart (embedded), never "uninstalled"
    service_account: str | None = None
    # The hub's certificate for the agent: its lifetime, and the share of it after which the
    # agent asks for the next one (with its own identity, for the same key).
    certificate_seconds: int = onboarding.CERTIFICATE_SECONDS
    renew_after: float = 2 / 3


def agent_config(rendered: Mapping[str, Any], bootstrap_token: str, city_target: KubeTarget,
                 folder: Path) -> AgentConfig:
    """The agent's configuration from what the city chart renders (``agent.json``) and its token."""
    bootstrap = token_kubeconfig(rendered["hubServer"], rendered["hubCaPem"].encode(), bootstrap_token,
                                 onboarding.bootstrap_account(rendered["city"]), folder)
    return AgentConfig(
        city=rendered["city"],
        city_target=city_target,
        hub_server=rendered["hubServer"],
        hub_ca_pem=rendered["hubCaPem"].encode(),
        bootstrap=KubeTarget(bootstrap, "hub"),
        join_request=dict(rendered["joinRequest"]),
        work_namespace=rendered["workNamespace"],
        heartbeat_seconds=float(rendered["heartbeatSeconds"]),
        scratch=folder / "identity",
        namespace=rendered.get("namespace", onboarding.SYSTEM_NAMESPACE),
        deployment=rendered.get("deployment"),
        service_account=rendered.get("serviceAccount"),
    )


def running_scenario_kinds(scenarios: Sequence[Mapping[str, Any]]) -> list[str]:
    """The kinds of the city's Ready scenarios (what a promotion's soak can observe there)."""
    return sorted({str(s.get("spec", {}).get("kind")) for s in scenarios
                   if any(c.get("type") == "Ready" and c.get("status") == "True"
                          for c in (s.get("status") or {}).get("conditions") or [])})


def rollup(fleets: Sequence[Mapping[str, Any]], scenarios: Sequence[Mapping[str, Any]],
           incidents: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The City status fields the agent reports: a pure summary of the city's objects."""
    by_type: dict[str, int] = {}
    for fleet in fleets:
        sensor_type = fleet.get("spec", {}).get("sensorType", "unknown")
        online = int((fleet.get("status") or {}).get("terminalsOnline") or 0)
        by_type[sensor_type] = by_type.get(sensor_type, 0) + online
    active = sum(
        1 for s in scenarios
        if any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (s.get("status") or {}).get("conditions") or [])
    )
    open_incidents = [i for i in incidents if i.get("spec", {}).get("state") != "Resolved"]
    status: dict[str, Any] = {
        "sensorsOnline": [{"sensorType": t, "count": n} for t, n in sorted(by_type.items())],
        "sensorsOnlineTotal": sum(by_type.values()),
        "activeScenarios": active,
        "openIncidents": len(open_incidents),
        "agentVersion": AGENT_VERSION,
    }
    if incidents:
        last = max(incidents, key=lambda i: str(i.get("spec", {}).get("detectedAt", "")))
        spec = last.get("spec", {})
        status["lastIncident"] = {
            "name": last["metadata"]["name"], "namespace": last["metadata"].get("namespace", ""),
            "kind": spec.get("kind"), "severity": spec.get("severity"), "detectedAt": spec.get("detectedAt"),
        }
    return status


RECENT_INCIDENTS = 50


def incident_digest(incidents: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The most recent incidents with their lifecycle, as the hub's situation picture shows them.

    Sent only when the City's data-residency policy exports ``incidents``; evidence (raw
    readings) stays in the city.
    """
    recent = sorted(incidents, key=lambda i: str(i.get("spec", {}).get("detectedAt", "")), reverse=True)
    digest = []
    for inc in recent[:RECENT_INCIDENTS]:
        spec = inc.get("spec", {})
        location = spec.get("location", {})
        digest.append({
            "name": inc["metadata"]["name"], "namespace": inc["metadata"].get("namespace", ""),
            "kind": spec.get("kind"), "severity": spec.get("severity"), "state": spec.get("state"),
            "drill": bool(spec.get("drill", False)), "detectedAt": spec.get("detectedAt"),
            "location": {k: location.get(k) for k in ("latitude", "longitude", "assetId", "description")
                         if location.get(k) is not None},
            "transitions": [{k: t.get(k) for k in ("state", "time", "actor")}
                            for t in spec.get("transitions", [])],
            "responseSeconds": (inc.get("status") or {}).get("responseSeconds"),
        })
    return digest


def object_readiness(obj: Mapping[str, Any] | None) -> tuple[str, str | None, str | None]:
    """(Ready status, reason, message) of an applied object, from its conditions."""
    if obj is None:
        return "Unknown", None, None
    generation = obj.get("metadata", {}).get("generation")
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            # (models engineer) a condition computed from an older spec says nothing about this one:
            # a promotion must not read the previous version's Ready as the new version's.
            observed = cond.get("observedGeneration")
            if generation is not None and observed is not None and observed < generation:
                return "Unknown", "Reconciling", "the city operator has not yet reconciled the latest spec"
            degraded = next((c for c in (obj.get("status") or {}).get("conditions") or []
                             if c.get("type") == "Degraded" and c.get("status") == "True"), None)
            if cond.get("reason") == "LastResolutionInUse" and degraded is not None:
                # The city keeps running what it verified before; the spec sent is not running.
                return "False", degraded.get("reason"), degraded.get("message")
            return str(cond.get("status", "Unknown")), cond.get("reason"), cond.get("message")
    if obj.get("kind") == "SensorType":
        return "True", None, None  # a catalogue entry has nothing to become ready
    return "Unknown", None, None


class CityAgent:
    """One city's agent; ``start`` runs it on a thread, ``stop`` ends it."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.city_api = client.ApiClient(config.city_target.client_configuration())
        self.city = Kube(self.city_api)
        self.city_custom = client.CustomObjectsApi(self.city_api)
        self.hub_api: client.ApiClient | None = None
        self._identity_pem: tuple[str, str] | None = None  # (certificate, key) the hub client uses
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"agent-{config.city}", daemon=True)
        self._applied: dict[str, str] = {}  # work name → hash applied in the city
        self._results: dict[str, dict[str, Any]] = {}  # work name → applied/message
        self._last_report: str | None = None
        self._last_status: dict[str, Any] | None = None
        self._last_lease = 0.0
        self._incidents: list[dict[str, Any]] = []
        self._scenario_kinds: list[str] = []
        self._exports_incidents = True  # until the City's data-residency policy is read
        self._owner: dict[str, Any] | None = None
        self.cycles = 0
        self.hub_reachable = False
        self.left = False  # told the hub it was offboarded

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> CityAgent:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop; if the release was uninstalled (a pod terminated by ``helm uninstall``), leave."""
        self._stop.set()
        self._thread.join(timeout)
        if not self.left and self.hub_api is not None:
            try:
                if self._release_gone():
                    self._leave()
            except _TRANSIENT as exc:
                log.warning("agent %s: could not tell whether the city was offboarded: %s",
                            self.config.city, exc)

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            try:
                if self.hub_api is None:
                    self.hub_api = self._join()
                    if self.hub_api is None:
                        self._stop.wait(2.0)
                        continue
                if self._release_gone():
                    self._leave()
                    return
                self._cycle()
                backoff = 1.0
            except _TRANSIENT as exc:
                self.hub_reachable = False
                log.warning("agent %s: cycle failed, retrying in %.0f s: %s", self.config.city, backoff,
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.config.heartbeat_seconds)
            except Exception:
                log.exception("agent %s: unexpected error; retrying", self.config.city)
                self._stop.wait(self.config.heartbeat_seconds)

    # -- the release that runs the agent ---------------------------------------------------
    def _release_gone(self) -> bool:
        """True once the city chart running this agent is uninstalled (never without a chart)."""
        if self.config.deployment is None:
            return False
        for attempt in range(2):
            try:
                deployment = client.AppsV1Api(self.city_api).read_namespaced_deployment(
                    self.config.deployment, self.config.namespace, _request_timeout=10)
            except client.ApiException as exc:
                if exc.status == 404:
                    return True
                # The chart's RoleBindings (403) and ServiceAccount (401: its tokens die with it) go
                # right after the Deployment; a refusal that persists means they are gone too.
                if exc.status not in (401, 403):
                    raise
                if attempt == 0:
                    time.sleep(2.0)
                    continue
                return True
            return deployment.metadata.deletion_timestamp is not None
        return False

    def _leave(self) -> None:
        """Tell the hub this city left; the city's side is cleaned up by garbage collection."""
        assert self.hub_api is not None
        moment = rfc3339(dt.datetime.now(dt.UTC))
        text = json.dumps({"objects": {}, "incidents": [], OFFBOARDED_KEY: moment}, sort_keys=True)
        client.CoreV1Api(self.hub_api).patch_namespaced_config_map(
            REPORT_CONFIGMAP, city_namespace(self.config.city), {"data": {REPORT_KEY: text}})
        self.left = True
        self._stop.set()
        log.info("agent %s: the city chart was uninstalled; told the hub at %s and stopped",
                 self.config.city, moment)

    def _owned(self, namespace: str | None) -> list[dict[str, Any]]:
        """Owner references that make an object in the release namespace go with the release."""
        if self.config.service_account is None or namespace != self.config.namespace:
            return []  # an owner in another namespace would make the garbage collector delete it
        if self._owner is None:
            account = client.CoreV1Api(self.city_api).read_namespaced_service_account(
                self.config.service_account, self.config.namespace)
            self._owner = {"apiVersion": "v1", "kind": "ServiceAccount",
                           "name": account.metadata.name, "uid": account.metadata.uid}
        return [self._owner]

    # -- joining -------------------------------------------------------------------------
    def _identity(self) -> dict[str, str]:
        """The agent's key (and certificate, once issued), kept in a Secret in its own city."""
        core = client.CoreV1Api(self.city_api)
        ns = self.config.namespace
        try:
            secret = core.read_namespaced_secret(IDENTITY_SECRET, ns)
            return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
        except client.ApiException as exc:
            if exc.status != 404:
                raise
        key = onboarding.new_private_key_pem().decode()
        body = {"metadata": {"name": IDENTITY_SECRET, "ownerReferences": self._owned(ns)},
                "stringData": {"tls.key": key}}
        try:
            core.create_namespaced_secret(ns, body)
        except client.ApiException as exc:
            if exc.status != 404:  # only the embedded agent's namespace may not exist yet
                raise
            self.city.ensure({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
            core.create_namespaced_secret(ns, body)
        return {"tls.key": key}

    def _save_certificate(self, cert_pem: str) -> None:
        client.CoreV1Api(self.city_api).patch_namespaced_secret(
            IDENTITY_SECRET, self.config.namespace, {"stringData": {"tls.crt": cert_pem}})

    def _join(self) -> client.ApiClient | None:
        """Return a hub client with the city's own certificate, or None while waiting."""
        identity = self._identity()
        cert = identity.get("tls.crt")
        if cert is None or _seconds_left(cert) < 60:
            # No certificate yet, or it lapsed while the agent was away: ask again for the same key.
            cert = self._request_certificate(identity["tls.key"].encode())
            if cert is None:
                return None
            self._save_certificate(cert)
        self._identity_pem = (cert, identity["tls.key"])
        log.info("agent %s: joined the hub as %s", self.config.city, onboarding.city_user(self.config.city))
        return self._hub_client(cert, identity["tls.key"])

    def _hub_client(self, cert_pem: str, key_pem: str) -> client.ApiClient:
        folder = self.config.scratch
        folder.mkdir(parents=True, exist_ok=True)
        serial = x509.load_pem_x509_certificate(cert_pem.encode()).serial_number
        for name, text in (("hub-ca.crt", self.config.hub_ca_pem.decode()),
                           (f"agent-{serial}.crt", cert_pem), (f"agent-{serial}.key", key_pem)):
            (folder / name).write_text(text)
            (folder / name).chmod(0o600)
        cfg = client.Configuration()
        cfg.host = self.config.hub_server
        cfg.ssl_ca_cert = str(folder / "hub-ca.crt")
        cfg.cert_file = str(folder / f"agent-{serial}.crt")
        cfg.key_file = str(folder / f"agent-{serial}.key")
        return client.ApiClient(cfg)

    def _join_request(self, key_pem: bytes) -> dict[str, Any]:
        request: dict[str, Any] = json.loads(json.dumps(self.config.join_request))
        request.setdefault("spec", {})["agentKeyFingerprint"] = onboarding.key_fingerprint(key_pem)
        request["spec"]["approved"] = False
        return request

    def _request_certificate(self, key_pem: bytes) -> str | None:
        """Ask to join with the bootstrap credential; the certificate once the hub approved it."""
        boot = client.ApiClient(self.config.bootstrap.client_configuration())
        custom = client.CustomObjectsApi(boot)
        mine = onboarding.key_fingerprint(key_pem)
        try:
            custom.create_cluster_custom_object(GROUP, VERSION, "cities", self._join_request(key_pem))
            log.info("agent %s: asked the hub to join with agent key %s; a hub administrator who sees this "
                     "key on City %s approves it", self.config.city, mine, self.config.city)
        except client.ApiException as exc:
            if exc.status != 409:
                raise
            city = custom.get_cluster_custom_object(GROUP, VERSION, "cities", self.config.city)
            recorded = city.get("spec", {}).get("agentKeyFingerprint")
            if recorded != mine:
                log.warning("agent %s: City %s on the hub records agent key %s, and this agent holds %s; "
                            "it joins only once a hub administrator re-keys the City: kubectl patch city %s "
                            "--type merge -p '{\"spec\":{\"agentKeyFingerprint\":\"%s\"}}'",
                            self.config.city, self.config.city, recorded, mine, self.config.city, mine)
        return self._certificate_from(client.CertificatesV1Api(boot), key_pem, renewal=False)

    def _certificate_from(self, certs: client.CertificatesV1Api, key_pem: bytes, *,
                          renewal: bool) -> str | None:
        """The city's one join (or renewal) request: its fresh certificate, or None while pending.

        A request for another key, denied, or whose certificate is already spent is replaced.
        """
        manifest = onboarding.csr_manifest(self.config.city, key_pem, renewal=renewal,
                                           expiration_seconds=self.config.certificate_seconds)
        name = manifest["metadata"]["name"]
        try:
            csr = certs.api_client.sanitize_for_serialization(certs.read_certificate_signing_request(name))
        except client.ApiException as exc:
            if exc.status != 404:
                raise
            csr = None
        if csr is not None:
            issued = (csr.get("status") or {}).get("certificate")
            failed = any(c.get("type") in ("Denied", "Failed")
                         for c in (csr.get("status") or {}).get("conditions") or [])
            same_key = onboarding.csr_key_fingerprint(csr) == onboarding.key_fingerprint(key_pem)
            current = self._identity_pem
            if issued and same_key:
                cert = base64.b64decode(issued).decode()
                if _seconds_left(cert) >= 60 and (current is None or cert != current[0]):
                    certs.delete_certificate_signing_request(name)  # spent: the next one starts afresh
                    return cert
            if issued or failed or not same_key:
                certs.delete_certificate_signing_request(name)
                csr = None
        if csr is None:
            certs.create_certificate_signing_request(manifest)
        return None  # the hub has not approved it yet

    def _renew_certificate(self) -> None:
        """Past ``renew_after`` of its lifetime, ask for the next certificate for the same key and
        swap to it when issued; the heartbeat goes on with the current one meanwhile."""
        current = self._identity_pem
        if current is None or self.hub_api is None:
            return
        cert = x509.load_pem_x509_certificate(current[0].encode())
        lifetime = (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds()
        due = cert.not_valid_before_utc + dt.timedelta(seconds=lifetime * self.config.renew_after)
        if dt.datetime.now(dt.UTC) < due:
            return
        renewed = self._certificate_from(client.CertificatesV1Api(self.hub_api), current[1].encode(),
                                         renewal=True)
        if renewed is None:
            return
        self._save_certificate(renewed)
        self._identity_pem = (renewed, current[1])
        self.hub_api = self._hub_client(renewed, current[1])
        log.info("agent %s: renewed its certificate (valid for %.0f s more)", self.config.city,
                 _seconds_left(renewed))

    # -- one cycle -------------------------------------------------------------------------
    def _cycle(self) -> None:
        assert self.hub_api is not None
        city_status = self._read_city()  # raises if the city's API server is down: no heartbeat
        hub_core = client.CoreV1Api(self.hub_api)
        ns = city_namespace(self.config.city)
        work = hub_core.list_namespaced_config_map(ns, label_selector=f"{WORK_LABEL}=true")
        self.hub_reachable = True
        self._follow_city_spec()
        items = [self.hub_api.sanitize_for_serialization(cm) for cm in work.items]
        for cm in items:
            self._apply_work(cm)
        self._remove_unlisted({cm["metadata"]["name"] for cm in items})
        self._heartbeat()
        self._renew_certificate()
        self._report()
        self._write_city_status(city_status)
        self.cycles += 1
        self._watch_work(hub_core, ns, work.metadata.resource_version)

    def _follow_city_spec(self) -> None:
        """The hub decides the heartbeat interval (City spec.connection); follow it."""
        assert self.hub_api is not None
        city = client.CustomObjectsApi(self.hub_api).get_cluster_custom_object(
            GROUP, VERSION, "cities", self.config.city)
        interval = city.get("spec", {}).get("connection", {}).get("heartbeatIntervalSeconds")
        exports = city.get("spec", {}).get("dataResidency", {}).get("exports", ["incidents"])
        self._exports_incidents = "incidents" in exports
        if interval:
            self.config.heartbeat_seconds = float(interval)

    def _read_city(self) -> dict[str, Any]:
        def items(plural: str) -> list[dict[str, Any]]:
            listed = self.city_custom.list_cluster_custom_object(GROUP, VERSION, plural, _request_timeout=10)
            return list(listed.get("items", []))
        incidents = items("incidents")
        record_incident_counts(incidents, city=self.config.city)
        self._incidents = incident_digest(incidents) if self._exports_incidents else []
        scenarios = items("scenarios")
        self._scenario_kinds = running_scenario_kinds(scenarios)
        return rollup(items("sensorfleets"), scenarios, incidents)

    def _target(self, manifest: dict[str, Any], work_name: str, work_hash: str) -> dict[str, Any]:
        target: dict[str, Any] = json.loads(json.dumps(manifest))
        meta = target.setdefault("metadata", {})
        if manifest["kind"] != "SensorType":
            meta["namespace"] = self.config.work_namespace
            owners = self._owned(self.config.work_namespace)
            if owners:
                meta["ownerReferences"] = owners
        meta.setdefault("labels", {})[PROPAGATED_LABEL] = "hub"
        meta.setdefault("annotations", {}).update(
            {WORK_NAME_ANNOTATION: work_name, WORK_HASH_ANNOTATION: work_hash})
        return target

    def _apply_work(self, cm: Mapping[str, Any]) -> None:
        name = cm["metadata"]["name"]
        work_hash = (cm["metadata"].get("annotations") or {}).get(WORK_HASH_ANNOTATION, "")
        if self._applied.get(name) == work_hash:
            return
        try:
            target = self._target(manifest_of(cm), name, work_hash)
            try:
                self.city.apply(target, field_manager=FIELD_MANAGER)
            except client.ApiException as exc:
                if exc.status != 404 or "namespaces" not in str(exc.body):
                    raise
                # The embedded agent makes its work namespace; a chart's exists already.
                self.city.ensure({"apiVersion": "v1", "kind": "Namespace",
                                  "metadata": {"name": self.config.work_namespace}})
                self.city.apply(target, field_manager=FIELD_MANAGER)
        except (ValueError, client.ApiException) as exc:
            if isinstance(exc, client.ApiException) and exc.status not in (400, 403, 404, 409, 422):
                raise  # a transient failure: the next cycle tries again
            message = _api_message(exc)
            log.warning("agent %s: could not apply %s: %s", self.config.city, name, message)
            self._results[name] = {"hash": work_hash, "applied": False, "message": message}
            self._applied[name] = work_hash  # do not retry the same bad manifest every cycle
            return
        self._applied[name] = work_hash
        self._results[name] = {"hash": work_hash, "applied": True}
        record_propagation(self.config.city, cm["metadata"].get("annotations"))
        if target.get("kind") == "SensorType":
            self._mark_propagated(target["metadata"]["name"], name)

    def _mark_propagated(self, sensor_type: str, work_name: str) -> None:
        """The city's copy of a SensorType says it is the hub's current spec (`Propagated`), as the
        hub's own says which cities hold it: `kubectl get sensortypes` is filled in both."""
        condition = {"type": "Propagated", "status": "True", "reason": "AppliedFromHub",
                     "message": f"This city holds the hub's current spec (work {work_name}).",
                     "lastTransitionTime": rfc3339(dt.datetime.now(dt.UTC))}
        try:
            self.city_custom.patch_cluster_custom_object_status(
                GROUP, VERSION, "sensortypes", sensor_type, {"status": {"conditions": [condition]}})
        except client.ApiException as exc:
            if exc.status not in (403, 404):
                raise
            log.warning("agent %s: could not mark SensorType %s propagated: %s", self.config.city,
                        sensor_type, _api_message(exc))

    def _propagated(self, plurals: Sequence[str] = ("sensortypes", "scenarios")) -> list[dict[str, Any]]:
        selector = f"{PROPAGATED_LABEL}=hub"
        found: list[dict[str, Any]] = []
        for plural in plurals:
            listed = self.city_custom.list_cluster_custom_object(GROUP, VERSION, plural,
                                                                 label_selector=selector)
            found.extend(listed.get("items", []))
        return found

    def _remove_unlisted(self, listed: set[str]) -> None:
        """Delete in the city what the hub's complete work list no longer names."""
        for obj in self._propagated():
            meta = obj["metadata"]
            work_name = (meta.get("annotations") or {}).get(WORK_NAME_ANNOTATION)
            if work_name and work_name not in listed:
                log.info("agent %s: the hub removed %s; deleting %s %s", self.config.city, work_name,
                         obj["kind"], meta["name"])
                self.city.delete(obj["apiVersion"], obj["kind"], meta["name"], meta.get("namespace"))
                self._applied.pop(work_name, None)
                self._results.pop(work_name, None)
        # (models engineer) work of kinds kept in the city when unlisted (a pinned AnalyticsModel)
        # leaves the report too, so the hub is not told about work it no longer asks for.
        for work_name in set(self._results) - listed:
            self._applied.pop(work_name, None)
            self._results.pop(work_name, None)

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._last_lease < self.config.heartbeat_seconds and self._last_lease:
            return
        assert self.hub_api is not None
        moment = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        client.CoordinationV1Api(self.hub_api).patch_namespaced_lease(
            AGENT_LEASE, city_namespace(self.config.city),
            {"spec": {"renewTime": moment, "holderIdentity": onboarding.city_user(self.config.city),
                      "leaseDurationSeconds": int(self.config.heartbeat_seconds * 4)}})
        self._last_lease = now

    def _report(self) -> None:
        assert self.hub_api is not None
        objects = {}
        # (models engineer) AnalyticsModels pinned by promotions report their readiness too; they
        # are not deleted when unlisted (a city keeps the model it last ran), hence not in removal.
        by_work = {(o["metadata"].get("annotations") or {}).get(WORK_NAME_ANNOTATION): o
                   for o in self._propagated(("sensortypes", "scenarios", "analyticsmodels"))}
        for name, result in self._results.items():
            ready, reason, message = object_readiness(by_work.get(name))
            entry = {**result, "ready": ready if result.get("applied") else "False"}
            if reason and result.get("applied"):
                entry["reason"] = reason
            if message and result.get("applied"):
                entry["message"] = message
            objects[name] = entry
        labels = self.config.join_request.get("metadata", {}).get("labels") or {}
        text = json.dumps({"objects": objects, "incidents": self._incidents, LABELS_KEY: labels,
                           SCENARIO_KINDS_KEY: self._scenario_kinds}, sort_keys=True)
        if text == self._last_report:
            return
        client.CoreV1Api(self.hub_api).patch_namespaced_config_map(
            REPORT_CONFIGMAP, city_namespace(self.config.city), {"data": {REPORT_KEY: text}})
        self._last_report = text

    def _write_city_status(self, status: dict[str, Any]) -> None:
        if status == self._last_status:
            return
        assert self.hub_api is not None
        # lastHeartbeat is the hub's to write (from this agent's Lease): one writer, and it moves
        # with every heartbeat, not only when this roll-up changes.
        body = {"status": status}
        client.CustomObjectsApi(self.hub_api).patch_cluster_custom_object_status(
            GROUP, VERSION, "cities", self.config.city, body)
        self._last_status = status

    def _watch_work(self, hub_core: client.CoreV1Api, ns: str, resource_version: str) -> None:
        """Apply work changes as they arrive, until the next heartbeat is due."""
        deadline = time.monotonic() + self.config.heartbeat_seconds
        stream = watch.Watch()
        while not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            for event in stream.stream(hub_core.list_namespaced_config_map, ns,
                                       label_selector=f"{WORK_LABEL}=true",
                                       resource_version=resource_version,
                                       timeout_seconds=max(1, int(min(remaining, 5))),
                                       _request_timeout=remaining + 5):
                obj = self.hub_api.sanitize_for_serialization(event["object"]) if self.hub_api else {}
                resource_version = obj.get("metadata", {}).get("resourceVersion", resource_version)
                if event["type"] in ("ADDED", "MODIFIED"):
                    self._apply_work(obj)
                elif event["type"] == "DELETED":
                    stream.stop()
                    return  # deletions are decided on a complete list, in the next cycle
                if self._stop.is_set():
                    stream.stop()
                    return


def _seconds_left(cert_pem: str) -> float:
    """Seconds until a PEM certificate expires (negative once it has)."""
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    return (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds()


def _api_message(exc: Exception) -> str:
    if isinstance(exc, client.ApiException) and exc.body:
        try:
            return str(json.loads(exc.body).get("message", exc.body))
        except ValueError:
            return str(exc.body)
    return str(exc)
