"""A water drill as a field source: its batches (pure), and its MQTT path through a real broker and
a real stream worker into the fleets' windows."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import numpy as np
import pytest
import yaml
from citynerve.models.detectors.water import KPA_PER_METRE_OF_WATER
from citynerve.workloads.dataplane.broker import OPERATOR_USER
from citynerve.workloads.dataplane.names import readings_stream
from citynerve.workloads.dataplane.streams import ensure_city_streams, ensure_fleet_streams
from citynerve.workloads.ingest.sensor_type import SensorType
from citynerve.workloads.sim.field import (
    FieldSourceError,
    FieldStep,
    FleetLogin,
    MqttFieldSource,
    real_seconds_per_simulated_second,
    water_field_batches,
    yesterday_midnight_ms,
)
from citynerve.workloads.sim.water import (
    LeakSpec,
    WaterRun,
    WaterScenarioSpec,
    WaterSensorLayout,
    choose_sensors,
    simulate_water,
)
from citynerve.workloads.water import ZONE_SUPPLY_TERMINAL

from tests.conftest import RunningBroker
from tests.test_dataplane_worker import Fleet, running, wait_for

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "sensortypes"
ORIGIN_MS = 1_796_515_200_000  # 2026-12-06T00:00:00Z
STEP_S = 900  # the run's hydraulic step, and the fleets' window
LATENESS_S = 60


def resource(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((SAMPLES / f"{name}.yaml").read_text()))


def sensor_type(name: str) -> SensorType:
    return SensorType.from_resource(name, resource(name)["spec"])


GAUGE = sensor_type("pipe-pressure-gauge")
METER = sensor_type("electromagnetic-flow-meter")


def small_run(steps: int = 4, leaks: tuple[LeakSpec, ...] = ()) -> WaterRun:
    """Two loggers and two metered links (one into the zone, one out of it), no simulation."""
    times = np.arange(steps, dtype=np.float64) * STEP_S
    pressure = np.column_stack([40.0 + times / 3600, 30.123456 - times / 7200])
    flow = np.column_stack([0.2 + times / 1e5, 0.05 + 0 * times])
    return WaterRun(WaterScenarioSpec(duration_s=int(times[-1]), leaks=leaks),
                    WaterSensorLayout(("J-1", "J-2"), ("L-in", "L-out"), (1, -1)), times, pressure, flow)


def entities(body: bytes) -> list[dict[str, Any]]:
    return list(json.loads(body))


# ---- pure: what is published --------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_batches_carry_one_entity_per_logger_in_kpa_and_the_zone_supply_in_m3_per_hour() -> None:
    run = small_run()
    steps = list(water_field_batches(run, GAUGE, METER, ORIGIN_MS))
    assert [s.observed_ms for s in steps] == [ORIGIN_MS + k * STEP_S * 1000 for k in range(4)]
    for k, step in enumerate(steps):
        observed = datetime.fromtimestamp(step.observed_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        pressure = entities(step.pressure)
        assert [e["id"] for e in pressure] == ["urn:ngsi-ld:Junction:J-1", "urn:ngsi-ld:Junction:J-2"]
        for j, e in enumerate(pressure):
            assert e == {"id": e["id"], "type": "Junction", "dateObserved": observed,
                         "pressure": round(float(run.pressure[k, j]) * KPA_PER_METRE_OF_WATER, 2)}
        [supply] = entities(step.supply)
        assert supply == {"id": f"urn:ngsi-ld:Pipe:{ZONE_SUPPLY_TERMINAL}", "type": "Pipe",
                          "dateObserved": observed,
                          "flow": round(float(run.consumption()[k]) * 3600, 3)}
    # the simulated time of day is kept: step 2 is at 00:30 of the origin's day
    assert json.loads(steps[2].pressure)[0]["dateObserved"] == "2026-12-06T00:30:00.000Z"
    assert entities(steps[1].pressure)[1]["pressure"] == pytest.approx(
        (30.123456 - 900 / 7200) * 9.80665, abs=0.005)


@pytest.mark.timeout(30)
def test_missing_values_are_not_sent_and_out_of_range_ones_are() -> None:
    run = small_run()
    run.pressure[1, 0] = np.nan
    run.pressure[2, 1] = -3.0  # below the gauge's 0 kPa: sent; the worker quarantines it
    run.flow[3, 1] = np.nan  # a meter missing: the zone's supply is unknown then
    steps = list(water_field_batches(run, GAUGE, METER, ORIGIN_MS))
    assert [e["id"].rsplit(":", 1)[1] for e in entities(steps[1].pressure)] == ["J-2"]
    assert entities(steps[2].pressure)[1]["pressure"] == round(-3.0 * KPA_PER_METRE_OF_WATER, 2)
    assert entities(steps[3].supply) == []
    assert all(len(entities(s.supply)) == 1 for s in steps[:3])


@pytest.mark.timeout(30)
def test_the_ground_truth_stays_with_the_drill() -> None:
    run = small_run(leaks=(LeakSpec(node="J-9", area_m2=0.01, start_s=1800),))
    for step in water_field_batches(run, GAUGE, METER, ORIGIN_MS):
        for e in entities(step.pressure) + entities(step.supply):
            assert set(e) <= {"id", "type", "dateObserved", "pressure", "flow"}
        assert b"J-9" not in step.pressure + step.supply
        assert b"1800" not in step.pressure + step.supply


@pytest.mark.timeout(30)
def test_origin_fleet_types_and_speedup_are_checked() -> None:
    with pytest.raises(ValueError, match="not a UTC midnight"):
        next(water_field_batches(small_run(), GAUGE, METER, ORIGIN_MS + 1000))
    with pytest.raises(ValueError, match="does not measure 'flow'"):
        next(water_field_batches(small_run(), GAUGE, GAUGE, ORIGIN_MS))
    assert real_seconds_per_simulated_second(None) == 0.0
    assert real_seconds_per_simulated_second(math.inf) == 0.0
    assert real_seconds_per_simulated_second(4500) == pytest.approx(1 / 4500)
    for bad in (0.5, 0.0, -2.0, math.nan):
        with pytest.raises(ValueError, match="at least 1"):
            real_seconds_per_simulated_second(bad)


@pytest.mark.timeout(30)
def test_yesterday_midnight_is_the_utc_midnight_before_last() -> None:
    assert yesterday_midnight_ms(datetime(2026, 12, 7, 0, 0, 0, tzinfo=UTC)) == ORIGIN_MS
    assert yesterday_midnight_ms(datetime(2026, 12, 7, 23, 59, 59, 999_000, tzinfo=UTC)) == ORIGIN_MS
    assert yesterday_midnight_ms() % 86_400_000 == 0
    assert 0 < time.time() * 1000 - yesterday_midnight_ms() <= 2 * 86_400_000
    with pytest.raises(ValueError, match="no time zone"):
        yesterday_midnight_ms(datetime(2026, 12, 7))  # noqa: DTZ001 - the naive datetime under test


# ---- over MQTT, through the fleets' workers -----------------------------------------------------
@contextlib.asynccontextmanager
async def drill_fleet(broker: RunningBroker, tmp_path: Path, name: str,
                      type_name: str) -> AsyncIterator[Fleet]:
    """A fleet of a catalogue SensorType with 15-min windows, as the city operator makes it.

    `provisioned` (tests/test_dataplane_worker.py) keeps windows for 1 h, which the broker refuses
    for 15-min windows (their duplicate window, 2 x the ack wait, is longer); so a day here.
    """
    passwords = broker.add_fleet(name)
    credentials = tmp_path / f"{name}-credentials"
    credentials.mkdir()
    (credentials / "username").write_text(f"{name}-ingest")
    (credentials / "password").write_text(passwords.ingest)
    nc = await nats.connect(broker.broker.url, user=OPERATOR_USER, password=broker.operator_password)
    js = nc.jetstream()
    await ensure_city_streams(js, broker.city)
    await ensure_fleet_streams(js, broker.city, name, window_s=STEP_S, allowed_lateness_s=LATENESS_S,
                               retention_hours=24)
    config = {"city": broker.city, "fleet": name, "sensorType": type_name,
              "sensorTypeSpec": resource(type_name)["spec"], "count": 50, "samplingIntervalSeconds": STEP_S,
              "windowSeconds": STEP_S, "allowedLatenessSeconds": LATENESS_S, "brokerUrl": broker.broker.url}
    try:
        yield Fleet(broker, name, config, credentials, passwords.terminal, nc, js)
    finally:
        await nc.close()


def source(broker: RunningBroker, pressure: Fleet, supply: Fleet) -> MqttFieldSource:
    return MqttFieldSource(broker.broker.mqtt_host, broker.broker.mqtt_port, broker.city,
                           FleetLogin(pressure.name, pressure.terminal_password),
                           FleetLogin(supply.name, supply.terminal_password))


def windowed_means(windows: list[Any]) -> dict[tuple[str, int], tuple[int, float]]:
    """(terminal, window start) → (count, mean), over one fleet's windows."""
    return {(str(s), w.start_ms): (int(c), float(m)) for w in windows
            for s, c, m in zip(w.sensor, w.count, w.mean, strict=True)}


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_a_water_run_published_over_mqtt_becomes_one_window_row_per_logger_and_step(
    broker: RunningBroker, tmp_path: Path
) -> None:
    network = "Net3"
    run = await asyncio.to_thread(simulate_water, WaterScenarioSpec(
        network=network, duration_s=4 * 3600, sensors=choose_sensors(network, 5)))
    origin = yesterday_midnight_ms()
    kpa = run.pressure * KPA_PER_METRE_OF_WATER
    m3h = run.consumption() * 3600
    starts = [origin + int(t) * 1000 for t in run.times_s]
    in_range = (kpa >= 0) & (kpa <= 1600)
    expected_pressure = {(node, starts[i]): kpa[i, j] for i in range(len(starts))
                         for j, node in enumerate(run.layout.pressure_nodes) if in_range[i, j]}
    expected_supply = {(ZONE_SUPPLY_TERMINAL, starts[i]): m3h[i] for i in range(len(starts))
                       if 0 <= m3h[i] <= 20000}
    out_of_range = int(((kpa < 0) | (kpa > 1600)).sum())
    # Net3 exercises all three: a missing pressure, a missing supply, a pressure below 0 kPa
    assert np.isnan(kpa).any()
    assert np.isnan(m3h).any()
    assert out_of_range

    async with (drill_fleet(broker, tmp_path, "pressure", GAUGE.name) as pressure,
                drill_fleet(broker, tmp_path, "supply", METER.name) as supply):
        async with running(pressure.worker()), running(supply.worker()):
            with source(broker, pressure, supply) as field:
                steps = list(water_field_batches(run, GAUGE, METER, origin))
                report = await asyncio.to_thread(field.publish, steps, STEP_S / 0.02)
            assert report.steps == len(steps)
            assert report.entities == int((~np.isnan(kpa)).sum()) + int((~np.isnan(m3h)).sum())
            await wait_for(lambda: pressure.windowed(len(expected_pressure)), 60, "the loggers windowed")
            await wait_for(lambda: supply.windowed(len(expected_supply)), 60, "the zone supply windowed")

            async def quarantined() -> bool:
                status = await pressure.status()
                return bool(status.get("rejectedReadings") == out_of_range
                            and status.get("acceptedReadings") == len(expected_pressure))
            await wait_for(quarantined, 30, f"{out_of_range} out-of-range pressures quarantined")
            # the catalogue's payloadSchema carries the valid range, so it is what sets them aside
            assert (await pressure.status())["quarantineReasons"] == {"payload-schema": out_of_range}

        for fleet, expected in ((pressure, expected_pressure), (supply, expected_supply)):
            got = windowed_means(await fleet.windows())
            assert got.keys() == expected.keys(), fleet.name
            for key, value in expected.items():
                count, mean = got[key]
                assert count == 1, key
                assert mean == pytest.approx(value, abs=0.005), key  # rounded to 0.01 / 0.001 on the wire
        assert {w.prop for w in await pressure.windows()} == {"pressure"}
        assert {w.prop for w in await supply.windows()} == {"flow"}
        assert {w.seconds for w in await pressure.windows()} == {STEP_S}


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_the_source_keeps_the_drills_pace_stops_when_told_and_names_a_refused_login(
    broker: RunningBroker, tmp_path: Path
) -> None:
    steps: list[FieldStep] = list(water_field_batches(small_run(4), GAUGE, METER, ORIGIN_MS))
    async with (drill_fleet(broker, tmp_path, "pressure", GAUGE.name) as pressure,
                drill_fleet(broker, tmp_path, "supply", METER.name) as supply):
        with source(broker, pressure, supply) as field:
            # a step is 0.2 s real: four steps span three intervals
            report = await asyncio.to_thread(field.publish, steps, STEP_S / 0.2)
            assert (report.steps, report.messages, report.entities) == (4, 8, 12)
            assert report.seconds >= 0.6

            stop = threading.Event()
            timer = threading.Timer(0.5, stop.set)
            timer.start()
            try:  # a step is 1 s real: the stop comes before the second
                stopped = await asyncio.to_thread(field.publish, steps, STEP_S / 1.0, stop)
            finally:
                timer.cancel()
            assert stopped.steps == 1
            assert stopped.seconds < 1.0
            assert (await asyncio.to_thread(field.publish, steps, None, stop)).steps == 0

        async def stored() -> bool:
            streams = [await f.js.stream_info(readings_stream(f.name)) for f in (pressure, supply)]
            return [s.state.messages for s in streams] == [5, 5]
        await wait_for(stored, 10, "every PUBACKed message in its fleet's readings stream")

        wrong = MqttFieldSource(broker.broker.mqtt_host, broker.broker.mqtt_port, broker.city,
                                FleetLogin(pressure.name, "not-the-password"),
                                FleetLogin(supply.name, supply.terminal_password), timeout_s=5)
        with wrong, pytest.raises(FieldSourceError, match=f"refused the login of fleet {pressure.name}"):
            await asyncio.to_thread(wrong.publish, steps)
