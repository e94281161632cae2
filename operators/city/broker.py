"""The city operator's side of the data plane: credentials, the broker's users, streams, fleet status.

Every identity on the city broker gets a password derived from one key (the chart's Secret
``citynerve-broker-key``, mounted as a file): ``HMAC-SHA256(key, "<role>/<fleet uid>")``. So the
operator never reads a fleet's Secret back — it may create Secrets, not read them — and the
broker's user list (bcrypt hashes with salts derived the same way) is the same text after any
restart: it is rewritten only when a fleet comes or goes. A fleet deleted and made again gets
new passwords (a new uid); a new key rotates every password.

The user list travels as Secret ``citynerve-broker-auth`` (key ``auth.conf``) in the operator's
own namespace; the broker mounts it and reloads when it changes (``docs/broker.md``).

A Scenario whose workload runs gets an identity of its own (``names.scoring_identity(uid)``,
password ``HMAC(key, "scoring/<scenario uid>")``) that may only read and acknowledge its fleets'
windows through the durable consumers the operator makes for it on their windows streams.

Streams, the consumer and the status bucket are made here with the operator's own broker user;
the fleets' stream workers write their status into the bucket, and a watch on it queues the
fleet, so the SensorFleet status follows the stream (not a ConfigMap every 15 s).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import bcrypt
import nats
from citynerve.operators.city.rbac import BROKER_AUTH_SECRET
from citynerve.workloads.dataplane import names
from citynerve.workloads.dataplane.broker import (
    OPERATOR_USER,
    BrokerUser,
    ingest_user,
    operator_user,
    render_auth,
    scoring_user,
    terminal_user,
)
from citynerve.workloads.dataplane.streams import (
    delete_fleet_streams,
    delete_scoring_consumer,
    ensure_city_streams,
    ensure_fleet_streams,
    ensure_scoring_consumer,
    scoring_consumers,
)
from nats.js.errors import KeyNotFoundError

log = logging.getLogger(__name__)
T = TypeVar("T")

AUTH_SECRET = BROKER_AUTH_SECRET
AUTH_KEY = "auth.conf"
BCRYPT_COST = 10
# Keys of a fleet's credential Secrets (the MQTT one for its terminals, the ingest one for its workers).
USERNAME_KEY, PASSWORD_KEY = "username", "password"


@dataclass(frozen=True)
class BrokerOptions:
    """Where the city broker is and how the operator proves who it is."""

    url: str  # nats://host:4222, reachable from the operator and from the fleets' workers
    key_file: Path  # the key every broker password is derived from
    namespace: str  # where Secret citynerve-broker-auth lives (the broker's namespace)

    def key(self) -> bytes:
        key = self.key_file.read_bytes().strip()
        if len(key) < 16:
            msg = f"the broker key in {self.key_file} is shorter than 16 bytes"
            raise ValueError(msg)
        return key


def derive_password(key: bytes, role: str, uid: str) -> str:
    """The password of one identity: what it is for, and whose (a fleet's uid, or ``operator``)."""
    digest = hmac.new(key, f"{role}/{uid}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


_BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def derived_hash(key: bytes, password: str, role: str, uid: str) -> str:
    """bcrypt of ``password`` with a salt derived from the key: the same text at every render."""
    seed = hmac.new(key, f"salt/{role}/{uid}".encode(), hashlib.sha256).digest()
    # bcrypt's salt is 22 characters of its own base64 (the last carries 4 significant bits).
    number = int.from_bytes(seed[:17], "big")
    chars = [_BCRYPT_ALPHABET[(number >> (6 * i)) & 63] for i in range(22)]
    chars[-1] = _BCRYPT_ALPHABET[_BCRYPT_ALPHABET.index(chars[-1]) & 0x30]
    salt = f"$2b${BCRYPT_COST:02d}$".encode() + "".join(chars).encode()
    return bcrypt.hashpw(password.encode(), salt).decode()


@dataclass(frozen=True)
class FleetIdentity:
    """What the broker must know of one SensorFleet."""

    namespace: str
    name: str
    uid: str
    protocol: str


@dataclass(frozen=True)
class ScenarioIdentity:
    """What the broker must know of one Scenario whose workload scores its fleets' windows."""

    namespace: str
    uid: str
    fleets: tuple[str, ...]  # by name, in the Scenario's namespace


@dataclass(frozen=True)
class ScoringAccess:
    """How a Scenario's workload reaches its fleets' windows: the broker, its identity, its consumer."""

    url: str
    user: str
    password: str = field(repr=False)  # never in a log line
    consumer: str  # the durable consumer on each of ``fleets``' windows streams
    fleets: tuple[str, ...]


class Credentials:
    """Passwords and hashes of the city's broker identities, derived from the key (hashes cached).

    ``scenarios`` (by uid) are the Scenarios whose workloads have a scoring identity; the caller
    changes it under the same lock as it renders with.
    """

    def __init__(self, key: bytes, city: str) -> None:
        self.key, self.city = key, city
        self._hashes: dict[tuple[str, str], str] = {}
        self.scenarios: dict[str, ScenarioIdentity] = {}

    def password(self, role: str, uid: str) -> str:
        return derive_password(self.key, role, uid)

    def _hash(self, role: str, uid: str) -> str:
        cached = self._hashes.get((role, uid))
        if cached is None:
            cached = self._hashes[(role, uid)] = derived_hash(self.key, self.password(role, uid), role, uid)
        return cached

    def users(self, fleets: Mapping[str, FleetIdentity]) -> list[BrokerUser]:
        """The operator, then per fleet its workers and (MQTT fleets) its terminals, by fleet name."""
        users = [operator_user(self._hash("operator", "operator"))]
        for name in sorted(fleets):
            fleet = fleets[name]
            users.append(ingest_user(self.city, name, self._hash("ingest", fleet.uid)))
            if fleet.protocol == "MQTT":
                users.append(terminal_user(self.city, name, self._hash("mqtt", fleet.uid)))
        users.extend(scoring_user(self.city, names.scoring_identity(uid), self.scoring_fleets(uid, fleets),
                                  self._hash("scoring", uid)) for uid in sorted(self.scenarios))
        live = {("operator", "operator")} | {(r, f.uid) for f in fleets.values() for r in ("ingest", "mqtt")}
        live |= {("scoring", uid) for uid in self.scenarios}
        for gone in set(self._hashes) - live:
            del self._hashes[gone]
        return users

    def scoring_fleets(self, uid: str, fleets: Mapping[str, FleetIdentity]) -> tuple[str, ...]:
        """The fleets a Scenario's identity may read: those it names that hold their name in the
        city's data plane for its own namespace (never a namesake fleet of another namespace)."""
        scenario = self.scenarios[uid]
        return tuple(sorted(f for f in set(scenario.fleets)
                            if f in fleets and fleets[f].namespace == scenario.namespace))

    def render(self, fleets: Mapping[str, FleetIdentity]) -> str:
        return render_auth(self.users(fleets))

    def secret_data(self, role: str, fleet: FleetIdentity) -> dict[str, str]:
        """A fleet credential Secret's data (base64, as the API wants it)."""
        username = fleet.name if role == "mqtt" else f"{fleet.name}-ingest"
        plain = {USERNAME_KEY: username, PASSWORD_KEY: self.password(role, fleet.uid)}
        return {k: base64.b64encode(v.encode()).decode() for k, v in plain.items()}


class BrokerAdmin:
    """The operator's connection to the city broker, on an event loop thread of its own.

    The reconciler is synchronous (its work queue's threads); each call here runs one coroutine
    on this loop and waits for it with a timeout, so an unreachable broker costs a reconcile a
    bounded wait and an error it can report, never a hang.
    """

    def __init__(self, city: str, options: BrokerOptions, timeout: float = 10.0) -> None:
        self.city, self.options, self.timeout = city, options, timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="broker-admin", daemon=True)
        self._thread.start()
        self._nc: Any = None
        self._js: Any = None
        self._city_ready = False
        self._watch: Any = None

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self.timeout)

    async def _jetstream(self) -> Any:
        if self._nc is None or self._nc.is_closed:
            password = derive_password(self.options.key(), "operator", "operator")
            self._nc = await nats.connect(
                self.options.url, user=OPERATOR_USER, password=password,
                name=f"citynerve-city-operator-{self.city}",
                max_reconnect_attempts=-1, reconnect_time_wait=1, connect_timeout=self.timeout / 2,
                allow_reconnect=True,
            )
            self._js = self._nc.jetstream(timeout=self.timeout / 2)
            self._city_ready = False
        if not self._city_ready:
            await ensure_city_streams(self._js, self.city)
            self._city_ready = True
        return self._js

    def ensure_fleet(self, fleet: str, spec: Mapping[str, Any]) -> None:
        """The fleet's readings and windows streams and its workers' consumer, as its spec says."""

        async def ensure() -> None:
            js = await self._jetstream()
            await ensure_fleet_streams(
                js, self.city, fleet,
                window_s=int(spec.get("windowSeconds", 300)),
                allowed_lateness_s=int(spec.get("allowedLatenessSeconds", 60)),
                retention_hours=24 * int(spec.get("historyRetentionDays", 30)),
            )

        self._run(ensure())

    def delete_fleet(self, fleet: str) -> None:
        async def delete() -> None:
            await delete_fleet_streams(await self._jetstream(), fleet)

        self._run(delete())

    def ensure_scoring(self, fleets: Sequence[str], consumer: str, start_time: datetime) -> None:
        """A Scenario's durable consumer on each of ``fleets``' windows streams (made once, then kept)."""

        async def ensure() -> None:
            js = await self._jetstream()
            for fleet in fleets:
                await ensure_scoring_consumer(js, fleet, consumer, start_time)

        self._run(ensure())

    def scoring_consumers(self, fleets: Sequence[str]) -> dict[str, list[str]]:
        """The Scenarios' consumers on each of ``fleets``' windows streams."""

        async def listed() -> dict[str, list[str]]:
            js = await self._jetstream()
            return {fleet: await scoring_consumers(js, fleet) for fleet in fleets}

        return self._run(listed())

    def delete_scoring(self, fleets: Sequence[str], consumer: str) -> None:
        """Remove a Scenario's consumer from ``fleets``' windows streams (missing ones are fine)."""

        async def delete() -> None:
            js = await self._jetstream()
            for fleet in fleets:
                await delete_scoring_consumer(js, fleet, consumer)

        self._run(delete())

    def fleet_status(self, fleet: str) -> dict[str, Any] | None:
        """What the fleet's stream worker last put in the status bucket; None before it has."""

        async def read() -> dict[str, Any] | None:
            js = await self._jetstream()
            kv = await js.key_value(names.FLEETS_BUCKET)
            try:
                entry = await kv.get(names.status_key(fleet))
            except KeyNotFoundError:
                return None
            try:
                value = json.loads(entry.value or b"")
            except ValueError:
                return None
            return value if isinstance(value, dict) else None

        return self._run(read())

    def watch_status(self, changed: Callable[[str], None]) -> None:
        """Call ``changed(fleet)`` (on this loop's thread) whenever a fleet's worker writes its status."""

        async def watch() -> None:
            while True:
                try:
                    js = await self._jetstream()
                    kv = await js.key_value(names.FLEETS_BUCKET)
                    watcher = await kv.watch(names.ALL_STATUS_KEYS, include_history=False)
                    async for entry in watcher:
                        if entry is not None and entry.key:
                            changed(entry.key.split(".", 1)[0])
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a broker away is retried, said once per try
                    log.warning("watching fleet status on the broker: %s; again in 5 s", exc)
                    await asyncio.sleep(5)

        self._watch = asyncio.run_coroutine_threadsafe(watch(), self._loop)

    def close(self) -> None:
        async def close() -> None:
            if self._watch is not None:
                self._watch.cancel()
            if self._nc is not None and not self._nc.is_closed:
                await self._nc.close()

        try:
            self._run(close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
