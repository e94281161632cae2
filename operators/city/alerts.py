"""Alert routes: which deliveries are due, their retries, the route address policy, and delivery.

A route records in the Incident's ``status.notifiedRoutes`` the last lifecycle state it was
sent, as ``<route>:<State>``; a route is due when the incident's state is past it. Moves made
faster than a delivery are coalesced: the route receives the current state with the whole
transition history.

Delivery is at least once. A failed delivery (timeout, connection error, any answer but 2xx:
redirects are never followed) is recorded in ``status.deliveryRetries`` with its reason and
the time of its next attempt, 5, 10, 20 … s apart per (incident, route), so an operator
restart or a resync never retries early. Every retry of one (incident, route, state) carries
the same delivery id, the receiver's idempotency key (``signing``).

Before each delivery the route's host is resolved and every address checked against the
city's ``AlertPolicy``; the connection goes to the address that was checked.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import SplitResult, urlsplit, urlunsplit

import httpx
from citynerve.operators.city.children import severity_at_least
from citynerve.operators.city.config import AlertPolicy
from citynerve.operators.city.signing import DELIVERY_HEADER, SIGNATURE_HEADER, sign_alert
from citynerve.operators.city.status import compute_incident_status, state_index
from citynerve.operators.conditions import parse_time, rfc3339, status_patch

# An address and port the cluster's API server answers on, as the operator's kubeconfig names it.
ApiServer = tuple[str, int]


@dataclass(frozen=True)
class Delivery:
    route: Mapping[str, Any]
    state: str

    @property
    def route_name(self) -> str:
        return str(self.route["name"])

    def delivery_id(self, incident_uid: str) -> str:
        """The idempotency key: the same for every retry of this (incident, route, state)."""
        return f"{incident_uid}/{self.route_name}/{self.state}"


class AlertDeliveryError(Exception):
    """A delivery that did not succeed: ``reason`` (CamelCase) and a message naming the route."""

    def __init__(self, reason: str, message: str, response: httpx.Response | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.response = response  # read by the webhook span for the HTTP status


# --- which deliveries are due ---------------------------------------------------------------------


def delivered_states(notified: Sequence[str]) -> dict[str, str]:
    """``route -> last state delivered`` from ``status.notifiedRoutes``."""
    out: dict[str, str] = {}
    for entry in notified:
        route, _, state = entry.partition(":")
        out[route] = state or "Detected"
    return out


def routes_for(
    incident_spec: Mapping[str, Any], routes: Sequence[Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    """The routes that take this incident, by its severity."""
    severity = str(incident_spec.get("severity", "warning"))
    return [r for r in routes if severity_at_least(severity, str(r.get("minSeverity", "alarm")))]


def deliveries_due(
    incident_spec: Mapping[str, Any],
    routes: Sequence[Mapping[str, Any]],
    notified: Sequence[str],
    retries: Mapping[str, DeliveryRetry],
    now: datetime,
) -> list[Delivery]:
    """Routes past which the incident's state has moved, except those waiting for a retry."""
    state = str(incident_spec.get("state", "Detected"))
    done = delivered_states(notified)
    return [
        Delivery(route, state)
        for route in routes_for(incident_spec, routes)
        if (route["name"] not in done or state_index(done[route["name"]]) < state_index(state))
        and (route["name"] not in retries or retries[route["name"]].due(now))
    ]


def record_delivery(notified: Sequence[str], delivery: Delivery) -> list[str]:
    kept = [e for e in notified if e.partition(":")[0] != delivery.route_name]
    return sorted([*kept, f"{delivery.route_name}:{delivery.state}"])


def delivered_event_message(delivery: Delivery) -> str:
    """The AlertDelivered Event's message: which state went to which route (its path and query left
    out: they may hold the receiver's token)."""
    return (
        f"State {delivery.state} was delivered to alert route {delivery.route_name} "
        f"({display_url(str(delivery.route['url']))}), signed."
    )


def failure_event_message(retry: DeliveryRetry) -> str:
    """The AlertFailed Event's message: the failure as the retry records it, with the attempt and when
    the route is tried again."""
    return (
        f"Delivering state {retry.state} to alert route {retry.route} failed ({retry.reason}): "
        f"{retry.message}."
    )


# --- retries --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryRetry:
    """A failed delivery to one route, as ``status.deliveryRetries`` keeps it."""

    route: str
    state: str
    attempts: int
    reason: str
    message: str
    last_attempt: datetime
    next_attempt: datetime

    def due(self, now: datetime) -> bool:
        return now >= self.next_attempt

    def to_status(self) -> dict[str, Any]:
        return {
            "route": self.route,
            "state": self.state,
            "attempts": self.attempts,
            "reason": self.reason,
            "message": self.message,
            "lastAttemptTime": rfc3339(self.last_attempt),
            "nextAttemptTime": rfc3339(self.next_attempt),
        }

    @classmethod
    def from_status(cls, entry: Mapping[str, Any]) -> DeliveryRetry | None:
        try:
            last, following = parse_time(entry["lastAttemptTime"]), parse_time(entry["nextAttemptTime"])
            if last is None or following is None:
                return None
            return cls(
                route=str(entry["route"]),
                state=str(entry["state"]),
                attempts=int(entry["attempts"]),
                reason=str(entry["reason"]),
                message=str(entry.get("message") or ""),
                last_attempt=last,
                next_attempt=following,
            )
        except (KeyError, TypeError, ValueError):  # an entry someone edited: retried at once
            return None


def retry_delay(attempts: int, base_seconds: float, max_seconds: float) -> float:
    """Seconds from the ``attempts``-th failure to the next attempt: base, twice that, four times … capped."""
    return float(min(max_seconds, base_seconds * 2 ** min(max(attempts, 1) - 1, 30)))


def stored_retries(
    incident: Mapping[str, Any], routes: Sequence[Mapping[str, Any]]
) -> dict[str, DeliveryRetry]:
    """Retries recorded on the Incident, for the routes that still take it (by route name)."""
    wanted = {str(r["name"]) for r in routes_for(incident["spec"], routes)}
    out: dict[str, DeliveryRetry] = {}
    for entry in (incident.get("status") or {}).get("deliveryRetries") or []:
        retry = DeliveryRetry.from_status(entry)
        if retry is not None and retry.route in wanted:
            out[retry.route] = retry
    return out


def record_failure(
    retries: Mapping[str, DeliveryRetry],
    delivery: Delivery,
    error: AlertDeliveryError,
    now: datetime,
    base_seconds: float,
    max_seconds: float,
) -> dict[str, DeliveryRetry]:
    """``retries`` with this failure recorded and its next attempt scheduled (pure)."""
    previous = retries.get(delivery.route_name)
    attempts = (previous.attempts if previous else 0) + 1
    following = now + timedelta(seconds=retry_delay(attempts, base_seconds, max_seconds))
    retry = DeliveryRetry(
        route=delivery.route_name,
        state=delivery.state,
        attempts=attempts,
        reason=error.reason,
        message=f"{str(error)[:3900]}; attempt {attempts} failed, next at {rfc3339(following)}",
        last_attempt=now,
        next_attempt=following,
    )
    return {**retries, delivery.route_name: retry}


def seconds_to_next_retry(retries: Iterable[DeliveryRetry], now: datetime) -> float | None:
    """When the earliest retry is due (0 if one is already), or None without retries."""
    waits = [(r.next_attempt - now).total_seconds() for r in retries]
    return max(0.0, min(waits)) if waits else None


def retries_status(retries: Mapping[str, DeliveryRetry]) -> list[dict[str, Any]]:
    return [retries[name].to_status() for name in sorted(retries)]


def incident_needs_reconcile(
    incident: Mapping[str, Any], routes: Sequence[Mapping[str, Any]], now: datetime
) -> bool:
    """Whether a listed Incident has a delivery due now or a status that differs from its computed one (pure).

    A failed delivery whose next attempt is still to come needs nothing: a resync never retries early.
    """
    notified = list((incident.get("status") or {}).get("notifiedRoutes") or [])
    retries = stored_retries(incident, routes)
    if deliveries_due(incident["spec"], routes, notified, retries, now):
        return True
    desired = compute_incident_status(incident, notified, retries_status(retries), now)
    return status_patch(incident.get("status"), desired) is not None


# --- the route address policy ---------------------------------------------------------------------

# Cloud instance-metadata endpoints: a route to one would hand the node's credentials to whoever
# reads the receiver's logs. Link-local ones are covered by their range; these are not.
METADATA_ADDRESSES: dict[str, str] = {
    "169.254.169.254": "AWS, GCP, Azure, OpenStack, Oracle and Huawei Cloud",
    "169.254.170.2": "AWS ECS task metadata",
    "169.254.0.23": "Tencent Cloud",
    "fd00:ec2::254": "AWS (IPv6)",
    "100.100.100.200": "Alibaba Cloud",
    "168.63.129.16": "Azure WireServer",
    "192.0.0.192": "Oracle Cloud Classic",
}
_API_SERVER_NAMES = ("kubernetes", "kubernetes.default")
_LOOPBACK_HINT = (
    "allow loopback receivers with the city chart's alerts.allowLoopback "
    "(operator flag --alerts-allow-loopback)"
)


def display_url(url: str) -> str:
    """``scheme://host[:port]`` of a route URL: its path and query may hold a receiver's token."""
    parts = urlsplit(url)
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname or ""
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}"


def route_endpoint(url: str) -> tuple[str, int]:
    """(host, port) a route URL connects to; ``ValueError`` if it names none."""
    parts = urlsplit(url)
    if not parts.hostname or parts.scheme not in ("http", "https"):
        msg = f"{display_url(url)} is not an http(s) URL with a host"
        raise ValueError(msg)
    return parts.hostname.rstrip(".").lower(), parts.port or (443 if parts.scheme == "https" else 80)


def address_refusal(
    address: str, port: int, policy: AlertPolicy, api_servers: Collection[ApiServer]
) -> str | None:
    """Why an alert may not go to ``address``:``port`` under ``policy``, or None if it may (pure)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone (fe80::1%eth0) is link-local
    except ValueError:
        return f"{address} is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:169.254.169.254 is 169.254.169.254
    text = str(ip)
    if any(_same_address(text, host) and port == api_port for host, api_port in api_servers):
        return f"{text}:{port} is the cluster's API server; alerts are never sent to it"
    if text in METADATA_ADDRESSES or ip.is_link_local:
        what = (
            f"the {METADATA_ADDRESSES[text]} instance-metadata address"
            if text in METADATA_ADDRESSES
            else "a link-local address"
        )
        if policy.allow_link_local:
            return None
        return (
            f"{text} is {what}; alerts are never sent there unless the city operator allows link-local "
            "and metadata addresses on their own (alerts.allowLinkLocal)"
        )
    if ip.is_loopback:  # before reserved: ::1 lies in the reserved ::/8
        return None if policy.allow_loopback else f"{text} is a loopback address; {_LOOPBACK_HINT}"
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        return (
            f"{text} is an unspecified, multicast or reserved address, not a receiver's; "
            "use the receiver's address"
        )
    if not ip.is_global and not policy.allow_private_networks:
        return (
            f"{text} is a private-network address and the city operator runs with "
            "alerts.allowPrivateNetworks false; use a public receiver or allow private networks"
        )
    return None


def _same_address(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


def route_refusal(
    route: Mapping[str, Any],
    addresses: Sequence[str],
    policy: AlertPolicy,
    api_servers: Collection[ApiServer],
) -> str | None:
    """Why alerts may not go to ``route`` whose host resolved to ``addresses``, or None (pure).

    Every address must be allowed: a name that also resolves to a refused address is refused.
    """
    name, url = route["name"], str(route["url"])
    where = f"alert route {name} ({display_url(url)})"
    try:
        host, port = route_endpoint(url)
    except ValueError as exc:
        return f"{where} is refused: {exc}"
    if host in _API_SERVER_NAMES or host.startswith("kubernetes.default."):
        return f"{where} is refused: {host} names the cluster's API server; alerts are never sent to it"
    for address in addresses:
        refusal = address_refusal(address, port, policy, api_servers)
        if refusal is not None:
            resolved = "" if _same_address(host.strip("[]"), address) else f"{host} resolves to {address}: "
            return f"{where} is refused: {resolved}{refusal}"
    return None


def resolve_host(host: str, port: int) -> tuple[str, ...]:
    """Every address ``host`` resolves to (an IP literal is itself); raises ``OSError``."""
    try:
        return (str(ipaddress.ip_address(host.strip("[]"))),)
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return tuple(dict.fromkeys(str(info[4][0]) for info in infos))


def api_server_endpoints(server_url: str) -> frozenset[ApiServer]:
    """The addresses and port of the API server at ``server_url`` (the operator's kubeconfig)."""
    try:
        host, port = route_endpoint(server_url)
        return frozenset((address, port) for address in resolve_host(host, port))
    except (ValueError, OSError):
        return frozenset()


@dataclass(frozen=True)
class RouteCheck:
    """A route's host resolved and checked: the addresses to connect to, or why not."""

    addresses: tuple[str, ...]
    refusal: str | None = None
    unresolved: str | None = None


def check_route(
    route: Mapping[str, Any], policy: AlertPolicy, api_servers: Collection[ApiServer]
) -> RouteCheck:
    """Resolve the route's host and check every address against ``policy`` (one DNS lookup)."""
    refusal = route_refusal(route, (), policy, api_servers)  # the URL and host name alone
    if refusal is not None:
        return RouteCheck((), refusal)
    host, port = route_endpoint(str(route["url"]))
    try:
        addresses = resolve_host(host, port)
    except OSError as exc:
        return RouteCheck((), unresolved=f"{host} could not be resolved ({exc})")
    return RouteCheck(addresses, route_refusal(route, addresses, policy, api_servers))


# --- the alert and its delivery -------------------------------------------------------------------


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


def _pinned(parts: SplitResult, address: str) -> str:
    """The URL with its host replaced by the checked address (the Host header keeps the name)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo + '@' if userinfo else ''}{host}{f':{parts.port}' if parts.port else ''}"
    return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))


def post_alert(
    route_name: str,
    url: str,
    addresses: Sequence[str],
    key: bytes,
    body: bytes,
    delivery_id: str,
    timeout: float,
    extra_headers: Mapping[str, str] | None = None,
) -> None:
    """POST one signed alert to the first of ``addresses`` that accepts a connection.

    Raises ``AlertDeliveryError`` unless the receiver answers 2xx: ``ReceiverTimeout``,
    ``ReceiverUnreachable``, ``Redirected`` (a 3xx: never followed) or ``ReceiverRefused``.
    Proxy settings from the environment are not used: the address checked is the one connected to.
    ``extra_headers`` carries the trace context (``traceparent``) to the receiver.
    """
    parts = urlsplit(url)
    host_header = parts.netloc.rpartition("@")[2]
    where = f"alert route {route_name} ({display_url(url)})"
    headers = {
        **(extra_headers or {}),
        "Host": host_header,
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign_alert(key, int(time.time()), delivery_id, body),
        DELIVERY_HEADER: delivery_id,
    }
    extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" and parts.hostname else {}
    response: httpx.Response | None = None
    last_error: Exception | None = None
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for address in addresses:
            try:
                response = client.post(_pinned(parts, address), content=body, headers=headers,
                                       extensions=extensions)
                break
            except httpx.TimeoutException as exc:
                raise AlertDeliveryError(
                    "ReceiverTimeout",
                    f"{where} did not answer within {timeout:g} s; make the receiver answer at once "
                    "(202) and work after, or it sees each retry",
                ) from exc
            except httpx.ConnectError as exc:  # try the next address
                last_error = exc
            except httpx.HTTPError as exc:
                raise AlertDeliveryError(
                    "ReceiverUnreachable", f"{where} failed: {exc}; check that the receiver is running"
                ) from exc
    if response is None:
        raise AlertDeliveryError(
            "ReceiverUnreachable",
            f"{where} could not be reached ({last_error or 'no address'}); check the URL and that the "
            "receiver is running",
        )
    status = response.status_code
    if 300 <= status < 400:
        target = response.headers.get("Location")
        location = display_url(target) if target else ""
        raise AlertDeliveryError(
            "Redirected",
            f"{where} answered {status} {response.reason_phrase}"
            f"{f' to {location}' if location else ''}; redirects are never followed: set the route's "
            "url to the receiver's final address",
            response,
        )
    if not 200 <= status < 300:
        hint = (
            "check that the receiver's key is the route's Secret key"
            if status in (401, 403)
            else "see the receiver's logs"
        )
        raise AlertDeliveryError(
            "ReceiverRefused", f"{where} answered {status} {response.reason_phrase}; {hint}", response
        )


# --- the route's Secret ---------------------------------------------------------------------------


def secret_refusal(route: Mapping[str, Any], allowed: Collection[str]) -> str | None:
    """Why the operator will not read a route's Secret, or None: the city chart must list it (pure).

    The chart's ``alerts.secretNames`` is both this list and the operator's RBAC on Secrets, so
    a route naming another Secret (a hub-placed Scenario naming the agent's key, say) is refused
    here, before any request, with what to do instead.
    """
    name = str(route["secretRef"]["name"])
    if name in allowed:
        return None
    listed = ", ".join(sorted(allowed)) or "none"
    return (
        f"alert route {route['name']}: the city operator may not read Secret {name} (listed: {listed}); "
        f"add {name} to the city chart's alerts.secretNames (operator flag --alert-secret) or name a "
        "listed Secret in its secretRef"
    )
