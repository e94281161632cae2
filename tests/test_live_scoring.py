"""Live scoring, pure: windows of a simulated water day into steps, steps into the fitted detector.

The same detector scoring the whole day at once (as a drill does) is the reference: fed window by
window through the assembler, the live scorer raises the same burst at the same step, once.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import cache

import numpy as np
import pytest
from citynerve.models.detectors.measures import threshold_metrics
from citynerve.models.detectors.water import KPA_PER_METRE_OF_WATER
from citynerve.operators.city.status import missing_references
from citynerve.workloads.dataplane.windows import Window
from citynerve.workloads.scoring import (
    PRESSURE_SENSOR_TYPE,
    SUPPLY_SENSOR_TYPE,
    LiveScoringError,
    StepAssembler,
    WaterScorer,
    scorer_for,
)
from citynerve.workloads.sim.water import (
    LeakSpec,
    WaterScenarioSpec,
    choose_sensors,
    model_baseline,
    simulate_water,
)
from citynerve.workloads.water import ZONE_SUPPLY_TERMINAL, HydraulicExpectation, build_detector

DAY0_MS = 1_764_979_200_000  # a UTC midnight: the simulated time of day is the readings' own
FLEETS = [
    {"fleet": "pressure", "sensorType": PRESSURE_SENSOR_TYPE, "windowSeconds": 900},
    {"fleet": "supply", "sensorType": SUPPLY_SENSOR_TYPE, "windowSeconds": 900},
]


@cache
def _detector_and_run() -> tuple[object, object]:
    base = WaterScenarioSpec(network="Net3", sensors=choose_sensors("Net3", 10), seed=3)
    detector = build_detector(base, history_days=3)
    run = simulate_water(replace(base, leaks=(LeakSpec(node="123", area_m2=0.02, start_s=9 * 3600),), seed=7))
    return detector, run


def _windows(run: object, step: int) -> list[Window]:
    """What the fleets' stream workers publish for simulated step ``step`` (kPa, m³/h)."""
    t_ms = DAY0_MS + int(run.times_s[step] * 1000)  # type: ignore[attr-defined]
    pressure = run.pressure[step]  # type: ignore[attr-defined]
    present = ~np.isnan(pressure)
    sensors = np.asarray(run.layout.pressure_nodes, dtype=object)[present]  # type: ignore[attr-defined]
    kpa = pressure[present] * KPA_PER_METRE_OF_WATER
    ones = np.ones(len(kpa), dtype=np.int64)
    out = [Window("c", "pressure", "pressure", t_ms, 900, sensors, ones, kpa, kpa, kpa)]
    supply = float(run.consumption()[step]) * 3600.0  # type: ignore[attr-defined]
    if math.isfinite(supply):
        one = np.array([supply])
        out.append(Window("c", "supply", "flow", t_ms, 900, np.array([ZONE_SUPPLY_TERMINAL], dtype=object),
                          np.ones(1, dtype=np.int64), one, one, one))
    return out


@pytest.mark.timeout(180)
def test_window_by_window_scoring_raises_the_burst_the_whole_day_scoring_raises_once() -> None:
    detector, run = _detector_and_run()
    scorer = scorer_for("water-burst", detector)
    assembler = StepAssembler(scorer.bindings(FLEETS), scorer.step_s)
    raised = []
    for step in range(len(run.times_s)):  # type: ignore[attr-defined]
        for window in _windows(run, step):
            done, _ = assembler.add(window, token=window.msg_id, now=0.0)
            for ready in done:
                raised += [(e, ready.start_ms) for e in scorer.score(ready)]
    assert raised, "the burst was not raised"
    first, at_ms = raised[0]
    assert first.detected_at_s == at_ms / 1000
    assert first.onset_s is not None
    assert first.onset_s >= DAY0_MS / 1000 + 9 * 3600 - 900
    # the reference: the same detector on the whole day at once (the scorer's context holds it)
    assert len(run.times_s) <= scorer.context_steps  # type: ignore[attr-defined]
    batch = detector.predict(scorer.window())  # type: ignore[attr-defined]
    assert batch
    assert batch[0].detected_at_s == first.detected_at_s
    assert batch[0].location.asset_id == first.location.asset_id
    assert len(raised) == len(batch)
    _, last_s, windows = scorer.context
    assert last_s == DAY0_MS / 1000 + run.times_s[-1]  # type: ignore[attr-defined]
    assert 0 < windows <= 2 * scorer.context_steps


@pytest.mark.timeout(180)
def test_a_model_swapped_mid_excursion_does_not_raise_it_again() -> None:
    detector, run = _detector_and_run()
    old = scorer_for("water-burst", detector)
    assembler = StepAssembler(old.bindings(FLEETS), old.step_s)
    scorer, raised, swapped = old, [], False
    for step in range(len(run.times_s)):  # type: ignore[attr-defined]
        for window in _windows(run, step):
            for ready in assembler.add(window, now=0.0)[0]:
                events = scorer.score(ready)
                raised += events
                if events and not swapped:  # the new version takes over at the next step
                    new = WaterScorer(detector)  # type: ignore[arg-type]
                    new.adopt(scorer)
                    scorer, swapped = new, True
    assert swapped
    assert len(raised) == 1


@pytest.mark.timeout(120)
def test_steps_complete_in_order_once_every_binding_passed_them_or_waited_too_long() -> None:
    scorer = scorer_for("water-burst", _detector_and_run()[0])
    assembler = StepAssembler(scorer.bindings(FLEETS), 900, max_wait_s=60)
    ms, logger = DAY0_MS, scorer.loggers[0]

    def window(fleet: str, prop: str, start: int, value: float) -> Window:
        sensor = logger if prop == "pressure" else ZONE_SUPPLY_TERMINAL
        arr = np.array([value])
        return Window("c", fleet, prop, start, 900, np.array([sensor], dtype=object), np.ones(1, np.int64),
                      arr, arr, arr)

    assert assembler.add(window("pressure", "pressure", ms, 500.0), now=0.0)[0] == []
    done, _ = assembler.add(window("supply", "flow", ms, 3600.0), now=1.0)
    assert [s.start_ms for s in done] == [ms]
    assert done[0].values["pressure"][logger] == pytest.approx(500.0 / KPA_PER_METRE_OF_WATER)
    assert done[0].values["consumption"][ZONE_SUPPLY_TERMINAL] == pytest.approx(1.0)
    # the supply fleet falls silent: the pressure step waits, then is scored without it
    assert assembler.add(window("pressure", "pressure", ms + 900_000, 500.0), now=2.0)[0] == []
    assert assembler.expire(now=30.0) == []
    expired = assembler.expire(now=70.0)
    assert [s.start_ms for s in expired] == [ms + 900_000]
    assert "consumption" not in expired[0].values
    # a window of a step already scored is acknowledged at once, never scored twice
    done, ack = assembler.add(window("supply", "flow", ms + 900_000, 3600.0), token="late", now=71.0)
    assert (done, ack) == ([], ["late"])
    # a property no binding reads, or a window off the step grid, is acknowledged and counted
    battery = window("pressure", "batteryLevel", ms + 1_800_000, 80.0)
    assert assembler.add(battery, token="b", now=72.0)[1] == ["b"]
    off_grid = window("pressure", "pressure", ms + 1_800_000 + 60_000, 1.0)
    assert assembler.add(off_grid, token="x", now=72.0)[1] == ["x"]
    assert assembler.ignored == 2


@pytest.mark.timeout(120)
def test_a_binding_the_model_cannot_score_is_refused_naming_what_to_change() -> None:
    detector, _ = _detector_and_run()
    scorer = scorer_for("water-burst", detector)
    with pytest.raises(LiveScoringError, match="electromagnetic-flow-meter"):
        scorer.bindings(FLEETS[:1])
    with pytest.raises(LiveScoringError, match=r"set its spec\.windowSeconds to 900"):
        scorer.bindings([{**FLEETS[0], "windowSeconds": 300}, FLEETS[1]])
    with pytest.raises(LiveScoringError, match="not built yet"):
        scorer_for("urban-flood", detector)
    legacy = WaterScorer.__new__(WaterScorer)
    detector.expectation, saved = None, detector.expectation  # type: ignore[attr-defined]
    try:
        with pytest.raises(LiveScoringError, match="train it again"):
            legacy.__init__(detector)  # type: ignore[misc]
    finally:
        detector.expectation = saved  # type: ignore[attr-defined]


@pytest.mark.timeout(30)
def test_a_threshold_the_detector_does_not_measure_is_refused_with_the_allowed_names() -> None:
    scenario = {"metadata": {"namespace": "n", "name": "s"},
                "spec": {"kind": "major-event", "fleets": [], "thresholds": [
                    {"metric": "carParkOccupancyPercent", "unitCode": "P1", "warning": 85, "alarm": 97}]}}
    reason, message = missing_references(scenario, {}, {})  # type: ignore[misc]
    assert reason == "UnknownThreshold"
    assert "carParkOccupancyPercent" in message
    assert "crowdDensityPer100Sqm" in message
    assert "dischargePercent" in threshold_metrics("mountain-flood")  # forecastDischargePercent's own metric
    ok = {**scenario, "spec": {**scenario["spec"], "thresholds": [
        {"metric": "crowdDensityPer100Sqm", "unitCode": "C62", "warning": 1, "alarm": 2}]}}
    assert missing_references(ok, {}, {}) is None


@pytest.mark.timeout(120)
def test_the_hydraulic_expectation_runs_the_model_on_day_after_day_with_its_tanks() -> None:
    """Two days of expectation, tanks carried over, are the model run for two days at once; the second
    day is not the first day again (the tanks did not go back to the model file's levels)."""
    spec = WaterScenarioSpec(network="Net3", sensors=choose_sensors("Net3", 10))
    expectation = HydraulicExpectation(spec)
    times = DAY0_MS / 1000 + np.arange(0, 2 * 86400, 900, dtype=np.float64)
    pressure, supply = expectation.at(times)
    both = model_baseline(replace(spec, duration_s=2 * 86400))
    np.testing.assert_allclose(pressure, both.pressure[:-1], atol=1e-3)  # metres
    np.testing.assert_allclose(supply, both.consumption()[:-1], atol=1e-6)  # m³/s
    first, second = pressure[:96], pressure[96:]
    assert float(np.max(np.abs(first - second))) > 0.05
    later = expectation.at(times[-4:])  # asked again: the same days, not run again
    np.testing.assert_array_equal(later[0], pressure[-4:])
