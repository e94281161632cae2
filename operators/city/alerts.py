"""Alert routes: which deliveries are due (pure), and signed webhook delivery.

A route records in the Incident's ``status.notifiedRoutes`` the last lifecycle state it was
sent, as ``<route>:<State>``; a route is due when the incident's state is past it. Moves made
faster than a delivery are coalesced: the route receives the current state with the whole
transition history.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
from citynerve.operators.city.children import severity_at_least
from citynerve.operators.city.status import compute_incident_status, state_index
from citynerve.operators.conditions import status_patch

SIGNATURE_HEADER = "X-CityNerve-Signature"
DELIVERY_HEADER = "X-CityNerve-Delivery"


@dataclass(frozen=True)
class Delivery:
    route: Mapping[str, Any]
    state: str

    @property
    def route_name(self) -> str:
        return str(self.route["name"])


def delivered_states(notified: Sequence[str]) -> dict[str, str]:
    """``route -> last state delivered`` from ``status.notifiedRoutes``."""
    out: dict[str, str] = {}
    for entry in notified:
        route, _, state = entry.partition(":")
        out[route] = state or "Detected"
    return out


def deliveries_due(
    incident_spec: Mapping[str, Any], routes: Sequence[Mapping[str, Any]], notified: Sequence[str]
) -> list[Delivery]:
    state = str(incident_spec.get("state", "Detected"))
    done = delivered_states(notified)
    return [
        Delivery(route, state)
        for route in routes
        if severity_at_least(
            str(incident_spec.get("severity", "warning")), str(route.get("minSeverity", "alarm"))
        )
        and (route["name"] not in done or state_index(done[route["name"]]) < state_index(state))
    ]


def record_delivery(notified: Sequence[str], delivery: Delivery) -> list[str]:
    kept = [e for e in notified if e.partition(":")[0] != delivery.route_name]
    return sorted([*kept, f"{delivery.route_name}:{delivery.state}"])


def alert_body(incident: Mapping[str, Any], state: str, city: str) -> bytes:
    meta, spec = incident["metadata"], incident["spec"]
    body = {
        "city": city,
        "incident": {"namespace": meta["namespace"], "name": meta["name"], "uid": meta.get("uid")},
        "state": state,
        "kind": spec["kind"],
        "severity": spec["severity"],
        "drill": spec.get("drill", False),
        "scenario": spec["scenarioRef"]["name"],
        "location": spec["location"],
        "detectedAt": spec["detectedAt"],
        "transitions": spec.get("transitions") or [],
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def signature(key: bytes, body: bytes) -> str:
    """The value of the signature header: ``sha256=<hex HMAC-SHA256 of the raw body>``."""
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def verify_signature(key: bytes, body: bytes, header: str) -> bool:
    return hmac.compare_digest(signature(key, body), header)


def post_alert(url: str, key: bytes, body: bytes, delivery_id: str, timeout: float,
               extra_headers: Mapping[str, str] | None = None) -> None:
    """POST one signed alert; raises ``httpx.HTTPError`` when the receiver fails or refuses it.

    ``extra_headers`` carries the trace context (``traceparent``) to the receiver.
    """
    response = httpx.post(
        url,
        content=body,
        timeout=timeout,
        headers={
            **(extra_headers or {}),
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature(key, body),
            DELIVERY_HEADER: delivery_id,
        },
    )
    response.raise_for_status()


def incident_needs_reconcile(
    incident: Mapping[str, Any], routes: Sequence[Mapping[str, Any]], now: datetime
) -> bool:
    """Whether a listed Incident has an alert due or a status that differs from its computed one (pure)."""
    notified = list((incident.get("status") or {}).get("notifiedRoutes") or [])
    if deliveries_due(incident["spec"], routes, notified):
        return True
    desired = compute_incident_status(incident, notified, None, now)
    return status_patch(incident.get("status"), desired) is not None
