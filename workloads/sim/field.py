"""A water drill as a field source: a simulated run's readings, published as a city's terminals would.

A `WaterRun` (`citynerve.workloads.sim.water`) becomes what two SensorFleets' terminals send over
MQTT (docs/data-plane.md, "A drill as a field source"):

* the pressure fleet: one terminal per pressure logger of the run (its junction's name), attribute
  ``pressure`` in kPa (metres of head * `KPA_PER_METRE_OF_WATER`, rounded to 0.01);
* the supply fleet: one terminal, `ZONE_SUPPLY_TERMINAL`, attribute ``flow`` in m³/h (the run's
  net supply by mass balance * 3600, rounded to 0.001).

The simulated time t (seconds from midnight) is observed at ``origin_ms + t·1000``, ``origin_ms`` a
UTC midnight, so the readings keep the simulated time of day. Missing values are not sent;
readings outside a property's valid range are (the fleet's worker quarantines them). The run's
ground truth (the leaks' nodes and onsets) stays with the drill: nothing here publishes it.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from citynerve.models.detectors.water import KPA_PER_METRE_OF_WATER
from citynerve.workloads.dataplane.names import readings_topic
from citynerve.workloads.ingest.sensor_type import SensorType
from citynerve.workloads.ngsi import entity_id
from citynerve.workloads.sim.water import WaterRun
from citynerve.workloads.water import ZONE_SUPPLY_TERMINAL
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)

PRESSURE = "pressure"  # the pressure fleet's attribute (kPa)
FLOW = "flow"  # the supply fleet's attribute (m³/h)
_DAY_MS = 86_400_000
_SECONDS_PER_HOUR = 3600.0


class FieldSourceError(RuntimeError):
    """The broker did not take a drill's readings: refused the login, or no PUBACK in time."""


@dataclass(frozen=True)
class FieldStep:
    """Everything both fleets' terminals send at one simulated time: an NGSI-LD (concise) JSON
    array of entities per fleet (``[]`` when every value of that fleet is missing then)."""

    observed_ms: int
    pressure: bytes
    supply: bytes


@dataclass(frozen=True)
class FieldReport:
    """What a publish sent: steps, MQTT messages (each PUBACKed), entities, and its wall time."""

    steps: int
    messages: int
    entities: int
    seconds: float


def yesterday_midnight_ms(now: datetime | None = None) -> int:
    """The UTC midnight before last (epoch ms): a simulated day from it lies wholly in the past."""
    now = datetime.now(UTC) if now is None else now
    if now.tzinfo is None:
        raise ValueError(f"yesterday_midnight_ms: {now.isoformat()} has no time zone; pass an aware datetime")
    today = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return int((today - timedelta(days=1)).timestamp() * 1000)


def _observed(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _require_property(sensor_type: SensorType, prop: str, fleet: str) -> None:
    if prop not in sensor_type.property_names:
        raise ValueError(f"the {fleet} fleet's SensorType {sensor_type.name} does not measure {prop!r} "
                         f"(it measures {', '.join(sensor_type.property_names)}); choose one that does")


def water_field_batches(run: WaterRun, pressure_type: SensorType, supply_type: SensorType,
                        origin_ms: int) -> Iterator[FieldStep]:
    """One `FieldStep` per simulated time of ``run``, in time order."""
    if origin_ms % _DAY_MS:
        raise ValueError(f"origin_ms {origin_ms} is not a UTC midnight: the readings would not keep the "
                         "simulated time of day; use yesterday_midnight_ms() or another midnight")
    _require_property(pressure_type, PRESSURE, "pressure")
    _require_property(supply_type, FLOW, "supply")
    pressure_kpa = np.round(run.pressure * KPA_PER_METRE_OF_WATER, 2)
    supply_m3h = np.round(run.consumption() * _SECONDS_PER_HOUR, 3)
    loggers = [entity_id(pressure_type.data_model, node) for node in run.layout.pressure_nodes]
    supply_id = entity_id(supply_type.data_model, ZONE_SUPPLY_TERMINAL)
    for i, t in enumerate(run.times_s):
        observed_ms = origin_ms + round(float(t) * 1000)
        observed = _observed(observed_ms)
        pressure = [
            {"id": logger, "type": pressure_type.data_model, "dateObserved": observed, PRESSURE: float(kpa)}
            for logger, kpa in zip(loggers, pressure_kpa[i], strict=True)
            if not math.isnan(kpa)
        ]
        supply = [] if math.isnan(supply_m3h[i]) else [
            {"id": supply_id, "type": supply_type.data_model, "dateObserved": observed,
             FLOW: float(supply_m3h[i])}
        ]
        yield FieldStep(observed_ms, json.dumps(pressure).encode(), json.dumps(supply).encode())


def real_seconds_per_simulated_second(speedup: float | None) -> float:
    """How long the source waits per simulated second: 1/speedup; 0 (no pacing) for None or inf."""
    if speedup is None or speedup == math.inf:
        return 0.0
    if not speedup >= 1:  # also NaN
        raise ValueError(f"speedup {speedup} must be at least 1 (real time), or None / inf for as fast "
                         "as the broker acknowledges")
    return 1.0 / speedup


class FleetTerminals:
    """One fleet's terminals on the city's broker: one MQTT client (the fleet's credential) that
    publishes QoS 1 to the fleet's readings topic and waits for each PUBACK.

    Like the demo's `FieldGateway.mqtt` (operators/demo/story.py), the client runs paho's network
    loop in its own thread and reconnects by itself (e.g. while the broker reloads its users); a
    message published while it is away is sent when it is back, and waited for all the same.
    """

    def __init__(self, host: str, port: int, city: str, fleet: str, username: str, password: str,
                 timeout_s: float = 10.0) -> None:
        self.fleet = fleet
        self.topic = readings_topic(city, fleet)
        self.timeout_s = timeout_s
        self._acked: set[int] = set()
        self._changed = threading.Condition()
        self._connected = False
        self._refused: str | None = None
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311,
                                  client_id=f"field-{city}-{fleet}-{uuid.uuid4().hex[:8]}")
        self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.connect_async(host, port)
        self.client.loop_start()

    def _on_connect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode,
                    _properties: Any) -> None:
        with self._changed:
            self._connected = not reason.is_failure
            self._refused = str(reason) if reason.is_failure else None
            self._changed.notify_all()

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, _reason: ReasonCode,
                       _properties: Any) -> None:
        with self._changed:
            self._connected = False

    def _on_publish(self, _client: mqtt.Client, _userdata: Any, mid: int, _reason: ReasonCode,
                    _properties: Any) -> None:
        with self._changed:
            self._acked.add(mid)
            self._changed.notify_all()

    def wait_connected(self) -> None:
        """Block until logged in; `FieldSourceError` if the broker refuses or does not answer in time."""
        with self._changed:
            connected = self._changed.wait_for(
                lambda: self._connected or self._refused is not None, self.timeout_s)
        if self._refused is not None:
            raise FieldSourceError(f"the broker refused the login of fleet {self.fleet}'s terminals: "
                                   f"{self._refused}; check the fleet's terminal credential")
        if not connected:
            raise FieldSourceError(f"fleet {self.fleet}'s terminals could not reach the broker within "
                                   f"{self.timeout_s} s")

    def send(self, body: bytes) -> None:
        """Publish ``body`` (QoS 1) and return once the broker has acknowledged it."""
        info = self.client.publish(self.topic, body, qos=1)
        # NO_CONN: paho keeps a QoS 1 message queued and sends it once reconnected
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise FieldSourceError(f"fleet {self.fleet}: publish to {self.topic} failed: "
                                   f"{mqtt.error_string(info.rc)}")
        with self._changed:
            acked = self._changed.wait_for(lambda: info.mid in self._acked, self.timeout_s)
            self._acked.discard(info.mid)
        if not acked:
            raise FieldSourceError(f"fleet {self.fleet}: no PUBACK from the broker for a message to "
                                   f"{self.topic} within {self.timeout_s} s")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass(frozen=True)
class FleetLogin:
    """A fleet and its terminals' credential (the broker's terminal user is named after the fleet)."""

    fleet: str
    password: str
    username: str = ""  # empty: the fleet's name

    @property
    def user(self) -> str:
        return self.username or self.fleet


class MqttFieldSource:
    """A drill's field source: the pressure fleet's and the supply fleet's terminals, one MQTT
    client each, publishing `FieldStep`s at the drill's pace."""

    def __init__(self, host: str, port: int, city: str, pressure: FleetLogin, supply: FleetLogin,
                 timeout_s: float = 10.0) -> None:
        self.pressure = FleetTerminals(host, port, city, pressure.fleet, pressure.user, pressure.password,
                                       timeout_s)
        self.supply = FleetTerminals(host, port, city, supply.fleet, supply.user, supply.password, timeout_s)

    def __enter__(self) -> MqttFieldSource:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def publish(self, steps: Iterable[FieldStep], speedup: float | None = None,
                stop: threading.Event | None = None) -> FieldReport:
        """Send each step (both fleets, each message PUBACKed) when its simulated time is due: a
        step Δt simulated seconds after the first goes Δt / ``speedup`` real seconds after it.
        Returns early, between steps, once ``stop`` is set."""
        pace = real_seconds_per_simulated_second(speedup)
        stop = stop if stop is not None else threading.Event()
        self.pressure.wait_connected()
        self.supply.wait_connected()
        started = time.monotonic()
        first_ms: int | None = None
        sent = messages = entities = 0
        for step in steps:
            first_ms = step.observed_ms if first_ms is None else first_ms
            due = started + (step.observed_ms - first_ms) / 1000 * pace
            if stop.wait(max(0.0, due - time.monotonic())):
                break
            for terminals, body in ((self.pressure, step.pressure), (self.supply, step.supply)):
                count = len(json.loads(body))
                if count:  # every value missing: the terminals send nothing
                    terminals.send(body)
                    messages += 1
                    entities += count
            sent += 1
        report = FieldReport(sent, messages, entities, time.monotonic() - started)
        log.info("field source: %d steps, %d messages, %d entities in %.1f s", report.steps,
                 report.messages, report.entities, report.seconds)
        return report

    def close(self) -> None:
        self.pressure.close()
        self.supply.close()
