"""Alert routes: signatures and which deliveries are due (no network)."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from citynerve.operators.city import alerts

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
