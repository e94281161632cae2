"""Alert routes: signing and verifying, which deliveries are due, retries, the address policy (no network)."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from citynerve.operators.city import alerts
from citynerve.operators.city.config import AlertPolicy
from citynerve.operators.city.signing import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    ReplayGuard,
    sign_alert,
    verify_alert,
)
from citynerve.operators.city.status import compute_incident_status

pytestmark = pytest.mark.timeout(10)
ROUTES = [
    {"name": "water", "url": "http://x", "secretRef": {"name": "s", "key": "k"}, "minSeverity": "alarm"},
    {"name": "all", "url": "http://y", "secretRef": {"name": "s", "key": "k"}, "minSeverity": "warning"},
]


KEY = b"duty-desk-key"
T = 1_783_829_700  # 2026-07-12T04:15:00Z
DELIVERY_ID = "6f1c2a9e-0b7d-4e1a-9c55-3d2f8a4b1e07/duty-desk/Detected"
BODY = b'{"state":"Detected"}'


def signed(
    key: bytes = KEY, t: int = T, delivery_id: str = DELIVERY_ID, body: bytes = BODY
) -> dict[str, str]:
    return {SIGNATURE_HEADER: sign_alert(key, t, delivery_id, body), DELIVERY_HEADER: delivery_id}


def test_signature_is_hmac_sha256_over_timestamp_delivery_id_and_body() -> None:
    digest = hmac.new(KEY, f"{T}.{DELIVERY_ID}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert sign_alert(KEY, T, DELIVERY_ID, BODY) == f"t={T},v1={digest}"
    verdict = verify_alert(KEY, signed(), BODY, now=T + 1)
    assert verdict
    assert verdict.reason == "Verified"
    assert (verdict.delivery_id, verdict.timestamp) == (DELIVERY_ID, T)
    assert not verify_alert(b"other", signed(), BODY, now=T)
    assert verify_alert(KEY, {k.lower(): v for k, v in signed().items()}, BODY, now=T)  # any case
    with pytest.raises(ValueError, match="delivery id"):
        sign_alert(KEY, T, "a.b", BODY)  # a dot would let id and body trade bytes


def test_a_replayed_delivery_is_refused_and_a_retry_of_a_taken_one_too() -> None:
    guard = ReplayGuard()
    assert verify_alert(KEY, signed(), BODY, now=T, seen=guard)
    replay = verify_alert(KEY, signed(), BODY, now=T + 10, seen=guard)
    assert (replay.ok, replay.reason) == (False, "Replayed")
    # The sender's own retry: same delivery id, new timestamp and signature; taken once only.
    retry = verify_alert(KEY, signed(t=T + 20), BODY, now=T + 20, seen=guard)
    assert (retry.ok, retry.reason) == (False, "Replayed")
    guard.forget(DELIVERY_ID)  # a receiver that failed to act on it wants the retry
    assert verify_alert(KEY, signed(t=T + 30), BODY, now=T + 30, seen=guard)
    assert verify_alert(KEY, signed(delivery_id=DELIVERY_ID.replace("Detected", "Dispatched")), BODY,
                        now=T, seen=guard)


def test_a_re_timed_or_re_addressed_delivery_fails_the_signature() -> None:
    headers = signed()
    re_timed = {**headers, SIGNATURE_HEADER: headers[SIGNATURE_HEADER].replace(f"t={T}", f"t={T + 400}")}
    assert verify_alert(KEY, re_timed, BODY, now=T + 400).reason == "SignatureMismatch"
    tampered = {**headers, DELIVERY_HEADER: DELIVERY_ID.replace("Detected", "Resolved")}
    assert verify_alert(KEY, tampered, BODY, now=T).reason == "SignatureMismatch"
    assert verify_alert(KEY, headers, BODY + b" ", now=T).reason == "SignatureMismatch"


@pytest.mark.parametrize("skew", [-301, 301, 10**6])
def test_a_timestamp_more_than_five_minutes_off_is_refused(skew: int) -> None:
    verdict = verify_alert(KEY, signed(), BODY, now=T + skew)
    assert (verdict.ok, verdict.reason) == (False, "TimestampOutOfTolerance")
    assert verify_alert(KEY, signed(), BODY, now=T + (300 if skew > 0 else -300))


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "MissingSignature"),
        ({SIGNATURE_HEADER: "sha256=" + "0" * 64, DELIVERY_HEADER: DELIVERY_ID}, "MalformedSignature"),
        ({SIGNATURE_HEADER: f"t={T}", DELIVERY_HEADER: DELIVERY_ID}, "MalformedSignature"),
        ({SIGNATURE_HEADER: "t=soon,v1=" + "0" * 64, DELIVERY_HEADER: DELIVERY_ID}, "MalformedSignature"),
        ({SIGNATURE_HEADER: f"t={T},v1=" + "é" * 64, DELIVERY_HEADER: DELIVERY_ID}, "MalformedSignature"),
        ({SIGNATURE_HEADER: f"t={T},t={T},v1=" + "0" * 64, DELIVERY_HEADER: DELIVERY_ID},
         "MalformedSignature"),
        ({SIGNATURE_HEADER: "t=١٢٣,v1=" + "0" * 64, DELIVERY_HEADER: DELIVERY_ID}, "MalformedSignature"),
        ({SIGNATURE_HEADER: "x" * 5000, DELIVERY_HEADER: DELIVERY_ID}, "MalformedSignature"),
        ({SIGNATURE_HEADER: f"t={T},v1=" + "0" * 64}, "MissingDeliveryId"),
        ({SIGNATURE_HEADER: f"t={T},v1=" + "0" * 64, DELIVERY_HEADER: "uid/rōute/Detected"},
         "MalformedDeliveryId"),
        ({SIGNATURE_HEADER: f"t={T},v1=" + "0" * 64, DELIVERY_HEADER: "a.b"}, "MalformedDeliveryId"),
    ],
)
def test_malformed_headers_are_refused_with_a_reason_never_an_exception(
    headers: dict[str, str], reason: str
) -> None:
    verdict = verify_alert(KEY, headers, BODY, now=T)
    assert (verdict.ok, verdict.reason) == (False, reason)


def test_non_ascii_headers_as_http_server_decodes_them_return_false() -> None:
    good = signed()
    latin1 = good[SIGNATURE_HEADER][:-1] + "\xe9"  # http.server decodes header bytes as ISO-8859-1
    assert verify_alert(KEY, {**good, SIGNATURE_HEADER: latin1}, BODY, now=T).ok is False
    assert verify_alert(KEY, {**good, DELIVERY_HEADER: DELIVERY_ID + "\xe9"}, BODY, now=T).ok is False
    assert verify_alert(KEY, {SIGNATURE_HEADER: 5, DELIVERY_HEADER: None}, BODY, now=T).ok is False  # type: ignore[dict-item]


def test_replay_guard_forgets_ids_once_their_timestamp_is_out_of_tolerance_and_is_bounded() -> None:
    guard = ReplayGuard(window_seconds=300, max_entries=2)
    assert guard.remember("a", T, T) is None
    assert guard.remember("b", T + 100, T + 100) is None
    assert guard.remember("c", T + 100, T + 100) == "ReplayGuardFull"  # never forgets what is replayable
    assert guard.remember("a", T, T + 299) == "Replayed"
    assert guard.remember("c", T + 301, T + 301) is None  # "a" expired: a replay of it is now stale
    assert len(guard) == 2
    # A replay of "a" after its expiry is refused by the clock instead.
    headers = signed(delivery_id="a")
    assert verify_alert(KEY, headers, BODY, now=T + 301, seen=guard).reason == "TimestampOutOfTolerance"


NOW = datetime(2026, 7, 12, 5, 0, tzinfo=UTC)


def test_routes_receive_detected_and_each_later_state_once() -> None:
    spec = {"severity": "alarm", "state": "Detected"}
    due = alerts.deliveries_due(spec, ROUTES, [], {}, NOW)
    assert [(d.route_name, d.state) for d in due] == [("water", "Detected"), ("all", "Detected")]
    notified: list[str] = []
    for delivery in due:
        notified = alerts.record_delivery(notified, delivery)
    assert notified == ["all:Detected", "water:Detected"]
    assert alerts.deliveries_due(spec, ROUTES, notified, {}, NOW) == []
    moved = alerts.deliveries_due({**spec, "state": "OnSite"}, ROUTES, notified, {}, NOW)
    assert [(d.route_name, d.state) for d in moved] == [("water", "OnSite"), ("all", "OnSite")]


def test_min_severity_filters_routes() -> None:
    due = alerts.deliveries_due({"severity": "warning", "state": "Detected"}, ROUTES, [], {}, NOW)
    assert [d.route_name for d in due] == ["all"]


def test_delivery_id_is_stable_per_incident_route_and_state() -> None:
    delivery = alerts.Delivery(ROUTES[0], "Dispatched")
    assert delivery.delivery_id("u-1") == "u-1/water/Dispatched" == delivery.delivery_id("u-1")
    assert verify_alert(KEY, signed(delivery_id=delivery.delivery_id("u-1")), BODY, now=T)


def test_backoff_doubles_from_five_seconds_and_is_capped() -> None:
    assert [alerts.retry_delay(n, 5, 300) for n in range(1, 9)] == [5, 10, 20, 40, 80, 160, 300, 300]
    assert alerts.retry_delay(10_000, 5, 300) == 300


def test_a_failed_delivery_waits_for_its_backoff_and_survives_in_status() -> None:
    spec = {"severity": "alarm", "state": "Detected"}
    delivery = alerts.Delivery(ROUTES[0], "Detected")
    error = alerts.AlertDeliveryError("ReceiverTimeout", "alert route water (http://x) did not answer in 5 s")
    retries = alerts.record_failure({}, delivery, error, NOW, 5, 300)
    retry = retries["water"]
    assert (retry.attempts, retry.next_attempt - NOW) == (1, timedelta(seconds=5))
    assert "attempt 1 failed, next at 2026-07-12T05:00:05Z" in retry.message
    due = alerts.deliveries_due(spec, ROUTES, [], retries, NOW + timedelta(seconds=4))
    assert [d.route_name for d in due] == ["all"]  # only the other route
    due = alerts.deliveries_due(spec, ROUTES, [], retries, retry.next_attempt)
    assert "water" in [d.route_name for d in due]
    again = alerts.record_failure(retries, delivery, error, retry.next_attempt, 5, 300)["water"]
    assert (again.attempts, again.next_attempt - retry.next_attempt) == (2, timedelta(seconds=10))
    assert alerts.seconds_to_next_retry([retry, again], NOW) == 5.0
    assert alerts.seconds_to_next_retry([], NOW) is None
    # Through the status: what one reconcile wrote, the next (or a restarted operator) reads back.
    incident: dict[str, Any] = {"metadata": {"name": "i"}, "spec": spec,
                                "status": {"deliveryRetries": alerts.retries_status(retries)}}
    assert alerts.stored_retries(incident, ROUTES) == retries
    assert alerts.stored_retries(incident, ROUTES[1:]) == {}  # the route was removed from the Scenario
    broken = {**incident, "status": {"deliveryRetries": [{"route": "water", "attempts": "x"}]}}
    assert alerts.stored_retries(broken, ROUTES) == {}  # an edited entry: retried at once


def test_alert_body_is_canonical_json() -> None:
    incident = {
        "metadata": {"namespace": "n", "name": "i", "uid": "u"},
        "spec": {
            "kind": "water-burst",
            "severity": "alarm",
            "scenarioRef": {"name": "s"},
            "location": {"latitude": "1", "longitude": "2"},
            "detectedAt": "2026-07-12T04:15:00Z",
        },
    }
    body = alerts.alert_body(incident, "Detected", "shanghai")
    assert body == alerts.alert_body(incident, "Detected", "shanghai")
    assert b'"state":"Detected"' in body


def test_a_resync_reconciles_only_incidents_with_something_to_do() -> None:
    now = NOW
    incident: dict[str, Any] = {
        "metadata": {"name": "i", "generation": 1},
        "spec": {"severity": "alarm", "state": "Detected", "detectedAt": "2026-07-12T04:15:00Z",
                 "transitions": [{"state": "Detected", "time": "2026-07-12T04:15:00Z", "actor": "x"}]},
        "status": None,
    }
    assert alerts.incident_needs_reconcile(incident, ROUTES, now)  # alerts due, no status yet
    notified = ["all:Detected", "water:Detected"]
    incident["status"] = compute_incident_status(incident, notified, [], now)
    assert not alerts.incident_needs_reconcile(incident, ROUTES, now)  # all delivered, nothing to write
    assert not alerts.incident_needs_reconcile(incident, ROUTES, now + timedelta(hours=5))  # time alone
    moved = {**incident, "spec": {**incident["spec"], "state": "Dispatched"}}
    assert alerts.incident_needs_reconcile(moved, ROUTES, now)  # a new state to deliver

    # A failed delivery: not before its next attempt, and then at once.
    error = alerts.AlertDeliveryError("ReceiverTimeout", "alert route water did not answer")
    retries = alerts.record_failure({}, alerts.Delivery(ROUTES[0], "Detected"), error, now, 5, 300)
    failed = {**incident, "status": compute_incident_status(
        incident, ["all:Detected"], alerts.retries_status(retries), now)}
    condition = next(c for c in failed["status"]["conditions"] if c["type"] == "Notified")
    assert (condition["status"], condition["reason"]) == ("False", "ReceiverTimeout")
    assert "alert route water" in condition["message"]
    assert not alerts.incident_needs_reconcile(failed, ROUTES, now + timedelta(seconds=4))
    assert alerts.incident_needs_reconcile(failed, ROUTES, now + timedelta(seconds=5))
    # The route removed from the Scenario: its retry is dropped from the status.
    assert alerts.incident_needs_reconcile(failed, ROUTES[1:], now + timedelta(seconds=1))


# --- the route address policy -------------------------------------------------------------------
DEFAULT = AlertPolicy()
API = frozenset({("10.96.0.1", 443), ("127.0.0.1", 6443)})


def route(url: str) -> dict[str, Any]:
    return {"name": "duty-desk", "url": url, "secretRef": {"name": "s", "key": "k"}}


@pytest.mark.parametrize(
    ("url", "addresses", "named"),
    [
        ("http://169.254.169.254/latest/meta-data", ["169.254.169.254"], "instance-metadata"),
        ("http://metadata.example/", ["169.254.10.1"], "link-local"),
        ("http://[fd00:ec2::254]/", ["fd00:ec2::254"], "instance-metadata"),
        ("http://100.100.100.200/latest", ["100.100.100.200"], "Alibaba Cloud"),
        ("http://[fe80::1]/", ["fe80::1"], "link-local"),
        ("http://[::ffff:169.254.169.254]/", ["::ffff:169.254.169.254"], "instance-metadata"),
        ("http://127.0.0.1:8080/", ["127.0.0.1"], "alerts.allowLoopback"),
        ("http://localhost:8080/", ["127.0.0.1", "::1"], "localhost resolves to 127.0.0.1"),
        ("http://[::1]/", ["::1"], "loopback"),
        ("http://0.0.0.0/", ["0.0.0.0"], "unspecified"),  # noqa: S104 - a route, not a bind
        ("http://[::]/", ["::"], "unspecified"),
        ("http://224.0.0.1/", ["224.0.0.1"], "multicast"),
        ("https://10.96.0.1/", ["10.96.0.1"], "API server"),
        ("https://kubernetes.default.svc/", [], "API server"),
        ("https://kubernetes.default.svc.cluster.local./api", [], "API server"),
        ("https://kubernetes/", [], "API server"),
        ("http://dual.example/", ["203.0.113.7", "169.254.169.254"], "169.254.169.254"),
    ],
)
def test_routes_to_metadata_loopback_unspecified_and_the_api_server_are_refused(
    url: str, addresses: list[str], named: str
) -> None:
    refusal = alerts.route_refusal(route(url), addresses, DEFAULT, API)
    assert refusal is not None
    assert refusal.startswith("alert route duty-desk (")
    assert named in refusal


def test_routes_to_public_and_private_receivers_are_allowed_and_policy_flags_are_separate() -> None:
    for url, addresses in [("https://dispatch.example.org/hooks?token=s3cret", ["203.0.113.7"]),
                           ("http://duty.city.svc:8080/", ["10.42.0.17"]),
                           ("http://192.168.1.20/", ["192.168.1.20"]),
                           ("http://[fd12::5]/", ["fd12::5"])]:
        assert alerts.route_refusal(route(url), addresses, DEFAULT, API) is None, url
    strict = AlertPolicy(allow_private_networks=False)
    private = alerts.route_refusal(route("http://10.0.0.5/"), ["10.0.0.5"], strict, API)
    assert "allowPrivateNetworks" in str(private)
    loopback = AlertPolicy(allow_loopback=True)
    assert alerts.route_refusal(route("http://127.0.0.1:9/"), ["127.0.0.1"], loopback, API) is None
    # Allowing loopback allows neither the API server on loopback nor metadata addresses.
    api = alerts.route_refusal(route("http://127.0.0.1:6443/"), ["127.0.0.1"], loopback, API)
    assert "API server" in str(api)
    assert alerts.route_refusal(route("http://169.254.169.254/"), ["169.254.169.254"], loopback, API)
    link_local = AlertPolicy(allow_link_local=True)
    metadata = route("http://169.254.169.254/")
    assert alerts.route_refusal(metadata, ["169.254.169.254"], link_local, API) is None
    assert alerts.route_refusal(route("http://127.0.0.1/"), ["127.0.0.1"], link_local, API)


def test_refusals_never_show_a_route_urls_path_or_query() -> None:
    refusal = alerts.route_refusal(route("http://127.0.0.1:8080/hooks/s3cret?token=t0ken"), ["127.0.0.1"],
                                   DEFAULT, API)
    assert refusal is not None
    assert "s3cret" not in refusal
    assert "t0ken" not in refusal
    assert "http://127.0.0.1:8080" in refusal


def test_api_server_endpoints_come_from_the_kubeconfig_url() -> None:
    assert alerts.api_server_endpoints("https://127.0.0.1:6443") == frozenset({("127.0.0.1", 6443)})
    assert alerts.api_server_endpoints("https://[::1]") == frozenset({("::1", 443)})
    assert alerts.api_server_endpoints("not a url") == frozenset()


def test_a_route_may_name_only_a_secret_the_chart_lists() -> None:
    duty = {"name": "duty-desk", "url": "https://x.example.org",
            "secretRef": {"name": "duty-webhook", "key": "k"}}
    assert alerts.secret_refusal(duty, ("duty-webhook", "flood-webhook")) is None
    stolen = {**duty, "name": "exfiltrate", "secretRef": {"name": "citynerve-hub-identity", "key": "tls.key"}}
    refusal = alerts.secret_refusal(stolen, ("duty-webhook",))
    assert refusal is not None
    # Names the route, the Secret, and what to set; lists what may be named.
    for part in ("exfiltrate", "citynerve-hub-identity", "alerts.secretNames", "--alert-secret",
                 "duty-webhook"):
        assert part in refusal, part
    assert "listed: none" in str(alerts.secret_refusal(duty, ()))
