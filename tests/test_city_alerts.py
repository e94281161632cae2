"""Alert routes: signatures and which deliveries are due (no network)."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from citynerve.operators.city import alerts
from citynerve.operators.city.status import compute_incident_status

pytestmark = pytest.mark.timeout(10)
ROUTES = [
    {"name": "water", "url": "http://x", "secretRef": {"name": "s", "key": "k"}, "minSeverity": "alarm"},
    {"name": "all", "url": "http://y", "secretRef": {"name": "s", "key": "k"}, "minSeverity": "warning"},
]


def test_signature_is_hmac_sha256_of_the_raw_body() -> None:
    body = b'{"state":"Detected"}'
    expected = "sha256=" + hmac.new(b"key", body, hashlib.sha256).hexdigest()
    assert alerts.signature(b"key", body) == expected
    assert alerts.verify_signature(b"key", body, expected)
    assert not alerts.verify_signature(b"other", body, expected)


def test_routes_receive_detected_and_each_later_state_once() -> None:
    spec = {"severity": "alarm", "state": "Detected"}
    due = alerts.deliveries_due(spec, ROUTES, [])
    assert [(d.route_name, d.state) for d in due] == [("water", "Detected"), ("all", "Detected")]
    notified: list[str] = []
    for delivery in due:
        notified = alerts.record_delivery(notified, delivery)
    assert notified == ["all:Detected", "water:Detected"]
    assert alerts.deliveries_due(spec, ROUTES, notified) == []
    moved = alerts.deliveries_due({**spec, "state": "OnSite"}, ROUTES, notified)
    assert [(d.route_name, d.state) for d in moved] == [("water", "OnSite"), ("all", "OnSite")]


def test_min_severity_filters_routes() -> None:
    due = alerts.deliveries_due({"severity": "warning", "state": "Detected"}, ROUTES, [])
    assert [d.route_name for d in due] == ["all"]


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
    now = datetime(2026, 7, 12, 5, 0, tzinfo=UTC)
    incident: dict[str, Any] = {
        "metadata": {"name": "i", "generation": 1},
        "spec": {"severity": "alarm", "state": "Detected", "detectedAt": "2026-07-12T04:15:00Z",
                 "transitions": [{"state": "Detected", "time": "2026-07-12T04:15:00Z", "actor": "x"}]},
        "status": None,
    }
    assert alerts.incident_needs_reconcile(incident, ROUTES, now)  # alerts due, no status yet
    notified = ["all:Detected", "water:Detected"]
    incident["status"] = compute_incident_status(incident, notified, None, now)
    assert not alerts.incident_needs_reconcile(incident, ROUTES, now)  # all delivered, nothing to write
    assert not alerts.incident_needs_reconcile(incident, ROUTES, now + timedelta(hours=5))  # time alone
    moved = {**incident, "spec": {**incident["spec"], "state": "Dispatched"}}
    assert alerts.incident_needs_reconcile(moved, ROUTES, now)  # a new state to deliver
    failed = {**incident, "status": compute_incident_status(incident, [], ("WebhookFailed", "down"), now)}
    assert alerts.incident_needs_reconcile(failed, ROUTES, now)  # a failed delivery is retried
