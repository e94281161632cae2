"""Signed, replay-proof alerts: the one signing helper and the verifier receivers import.

Every alert carries two headers::

    X-CityNerve-Delivery:  <incident uid>/<route>/<state>
    X-CityNerve-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<delivery id>.<body>">

The delivery id is the idempotency key: every retry of one (incident, route, state) delivery
carries the same id, each with a fresh timestamp and signature. A receiver checks with
``verify_alert``: the signature over timestamp, delivery id and body; the timestamp within
``TOLERANCE_SECONDS`` of its clock; and, with a ``ReplayGuard``, that it has not taken this
delivery id before. Only the standard library is used, so a receiver imports this module alone.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

SIGNATURE_HEADER = "X-CityNerve-Signature"
DELIVERY_HEADER = "X-CityNerve-Delivery"
SCHEME = "v1"
# A receiver refuses a timestamp further than this from its own clock (either way).
TOLERANCE_SECONDS = 300
# Delivery ids are ``<uid>/<route>/<state>``: never a dot, so "<t>.<id>.<body>" splits one way only.
_DELIVERY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_:/-]{0,252}")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_MAX_SIGNATURE_HEADER = 1024


class Headers(Protocol):
    """Anything with ``get(name)``: a dict, ``http.server``'s message, Starlette's or httpx's headers."""

    def get(self, name: str, /) -> object: ...


def signed_payload(timestamp: int, delivery_id: str, body: bytes) -> bytes:
    """The bytes the HMAC covers: ``<t>.<delivery id>.<body>``."""
    return f"{timestamp}.{delivery_id}.".encode("ascii") + body


def sign_alert(key: bytes, timestamp: int, delivery_id: str, body: bytes) -> str:
    """The ``X-CityNerve-Signature`` value for one delivery: ``t=<timestamp>,v1=<hex HMAC-SHA256>``."""
    if not _DELIVERY_ID.fullmatch(delivery_id):
        msg = f"delivery id {delivery_id!r} must be 1-253 characters of A-Z a-z 0-9 _ : / -"
        raise ValueError(msg)
    digest = hmac.new(key, signed_payload(timestamp, delivery_id, body), hashlib.sha256).hexdigest()
    return f"t={timestamp},{SCHEME}={digest}"


@dataclass(frozen=True)
class AlertVerdict:
    """What ``verify_alert`` decided; true only for an authentic, fresh, first delivery.

    ``reason`` is ``Verified`` or why not: ``MissingSignature``, ``MalformedSignature``,
    ``MissingDeliveryId``, ``MalformedDeliveryId``, ``TimestampOutOfTolerance``,
    ``SignatureMismatch``, ``Replayed`` (this delivery id was taken before: answer 2xx and do
    not act again) or ``ReplayGuardFull``.
    """

    ok: bool
    reason: str
    delivery_id: str | None = None
    timestamp: int | None = None

    def __bool__(self) -> bool:
        return self.ok


class ReplayGuard:
    """Delivery ids a receiver has taken, each kept until its timestamp leaves the tolerance window.

    After that the timestamp check refuses a replay by itself, so memory holds at most the ids
    of one window, and never more than ``max_entries``: when full, new deliveries are refused
    (``ReplayGuardFull``; the sender retries later) rather than forgetting ids still replayable.
    Thread-safe; one guard per receiving process.
    """

    def __init__(self, window_seconds: float = TOLERANCE_SECONDS, max_entries: int = 100_000) -> None:
        self.window_seconds = window_seconds
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def remember(self, delivery_id: str, timestamp: float, now: float) -> str | None:
        """Record ``delivery_id``; None if it is new, else the reason it is refused."""
        with self._lock:
            self._expire(now)
            if delivery_id in self._expiry:
                return "Replayed"
            if len(self._expiry) >= self.max_entries:
                return "ReplayGuardFull"
            # Remember it for as long as some clock within tolerance would accept its timestamp.
            expiry = max(timestamp, now) + self.window_seconds
            self._expiry[delivery_id] = expiry
            heapq.heappush(self._heap, (expiry, delivery_id))
            return None

    def forget(self, delivery_id: str) -> None:
        """Let a delivery be taken again (the receiver failed to act on it and wants the retry)."""
        with self._lock:
            self._expiry.pop(delivery_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._expiry)

    def _expire(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            expiry, delivery_id = heapq.heappop(self._heap)
            if self._expiry.get(delivery_id) == expiry:
                del self._expiry[delivery_id]
        if len(self._heap) > 2 * len(self._expiry) + 64:  # entries left behind by ``forget``
            self._heap = [(e, d) for d, e in self._expiry.items()]
            heapq.heapify(self._heap)


def _header(headers: Headers | Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None and isinstance(headers, Mapping):  # a plain dict: match the name in any case
        wanted = name.lower()
        value = next((v for k, v in headers.items() if isinstance(k, str) and k.lower() == wanted), None)
    return value if isinstance(value, str) else None


def _parse_signature(header: str) -> tuple[int, list[bytes]] | None:
    """``(t, [v1 digests])`` of a signature header, or None for anything malformed."""
    if len(header) > _MAX_SIGNATURE_HEADER or not header.isascii():
        return None
    timestamp: int | None = None
    digests: list[bytes] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            return None
        if name == "t":
            if timestamp is not None or not _TIMESTAMP.fullmatch(value):
                return None
            timestamp = int(value)
        elif name == SCHEME:
            if not _HEX_DIGEST.fullmatch(value):
                return None
            digests.append(value.encode("ascii"))
        # other schemes are ignored: a sender may add newer ones beside v1
    if timestamp is None or not digests:
        return None
    return timestamp, digests


def verify_alert(
    key: bytes,
    headers: Headers | Mapping[str, str],
    body: bytes,
    *,
    now: float | None = None,
    seen: ReplayGuard | None = None,
    tolerance_seconds: float = TOLERANCE_SECONDS,
) -> AlertVerdict:
    """Check one received alert; never raises on what a sender (or an attacker) put in the request.

    ``headers`` are the request's headers (looked up by name); ``body`` the raw bytes as received.
    With ``seen``, a delivery id is accepted once within the tolerance window; without it the
    caller must deduplicate on ``delivery_id`` itself.
    """
    header = _header(headers, SIGNATURE_HEADER)
    if header is None:
        return AlertVerdict(ok=False, reason="MissingSignature")
    parsed = _parse_signature(header)
    if parsed is None:
        return AlertVerdict(ok=False, reason="MalformedSignature")
    timestamp, digests = parsed
    delivery_id = _header(headers, DELIVERY_HEADER)
    if delivery_id is None:
        return AlertVerdict(ok=False, reason="MissingDeliveryId", timestamp=timestamp)
    if not delivery_id.isascii() or not _DELIVERY_ID.fullmatch(delivery_id):
        return AlertVerdict(ok=False, reason="MalformedDeliveryId", timestamp=timestamp)
    if not isinstance(body, bytes | bytearray | memoryview):
        return AlertVerdict(
            ok=False, reason="SignatureMismatch", delivery_id=delivery_id, timestamp=timestamp
        )
    clock = time.time() if now is None else now
    if abs(clock - timestamp) > tolerance_seconds:
        return AlertVerdict(
            ok=False, reason="TimestampOutOfTolerance", delivery_id=delivery_id, timestamp=timestamp
        )
    expected = hmac.new(
        key, signed_payload(timestamp, delivery_id, bytes(body)), hashlib.sha256
    ).hexdigest().encode("ascii")
    # Every v1 digest is compared (in constant time each), so none is skipped by an early match.
    matched = [hmac.compare_digest(expected, digest) for digest in digests]
    if not any(matched):
        return AlertVerdict(
            ok=False, reason="SignatureMismatch", delivery_id=delivery_id, timestamp=timestamp
        )
    if seen is not None:
        refused = seen.remember(delivery_id, timestamp, clock)
        if refused is not None:
            return AlertVerdict(ok=False, reason=refused, delivery_id=delivery_id, timestamp=timestamp)
    return AlertVerdict(ok=True, reason="Verified", delivery_id=delivery_id, timestamp=timestamp)
