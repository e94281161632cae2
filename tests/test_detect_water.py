"""The water leak detector and localiser on synthetic windows (no hydraulic simulation)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from citynerve.models.detectors.base import SensorWindow, Window, cusum
from citynerve.models.detectors.water import LeakLocaliser, WaterLeakDetector

STEP = 900.0
SENSORS = ("a", "b", "c", "d")
SIGNATURES = np.array([[-1.0, -0.5, -0.1, 0.0], [0.0, -0.2, -1.0, -0.6], [-0.3, -0.3, -0.3, -0.3]])


def window(days: int, drop: np.ndarray | None = None, onset: int = 0, seed: int = 0) -> Window:
    rng = np.random.default_rng(seed)
    n = days * 96
    times = np.arange(n) * STEP
    model = 40.0 + 5.0 * np.sin(2 * np.pi * times / 86400.0)[:, None] * np.ones(len(SENSORS))
    field = model + 0.3 + 0.05 * rng.standard_normal(model.shape)  # a standing offset plus noise
    if drop is not None:
        field[onset:] += drop
    return {
        "pressure": SensorWindow(times, SENSORS, field),
        "pressure_model": SensorWindow(times, SENSORS, model),
    }


def test_cusum_accumulates_only_past_the_slack() -> None:
    np.testing.assert_allclose(cusum(np.array([0.5, 2.0, 2.0, -5.0, np.nan]), 1.0), [0.0, 1.0, 2.0, 0.0, 0.0])


def test_a_pressure_drop_is_detected_and_located() -> None:
    localiser = LeakLocaliser(("n1", "n2", "n3"), SIGNATURES, {"n2": (121.4, 31.2)})
    detector = WaterLeakDetector(step_s=STEP, localiser=localiser).fit(window(4, seed=1))
    onset = 50
    events = detector.predict(window(1, drop=0.8 * SIGNATURES[1], onset=onset, seed=2))
    assert len(events) == 1
    event = events[0]
    assert event.location.asset_id == "n2"
    assert (event.location.lon, event.location.lat) == (121.4, 31.2)
    assert onset * STEP <= event.detected_at_s <= (onset + 4) * STEP
    assert event.onset_s == pytest.approx(onset * STEP, abs=2 * STEP)
    assert detector.explain(event)["candidates"][0][0] == "n2"


def test_no_alarm_without_a_leak() -> None:
    detector = WaterLeakDetector(step_s=STEP).fit(window(4, seed=1))
    assert detector.predict(window(3, seed=7)) == []


def test_unfitted_detector_says_so() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        WaterLeakDetector(step_s=STEP).score(window(1))
    with pytest.raises(KeyError, match="pressure_model"):
        WaterLeakDetector(step_s=STEP).fit({"pressure": window(1)["pressure"]})


def metered(days: int, surge: float = 0.0, onset: int = 0, seed: int = 0, **kw: Any) -> Window:
    """A window with the zone's metered supply besides the loggers: `surge` more from `onset` on."""
    base = window(days, onset=onset, seed=seed, **kw)
    times = base["pressure"].times_s
    model = 0.7 + 0.1 * np.sin(2 * np.pi * times / 86400.0)
    field = model * (1.02 + 0.002 * np.random.default_rng(seed + 100).standard_normal(len(times)))
    field[onset:] += surge * model[onset:]
    return {
        **base,
        "consumption": SensorWindow(times, ("zone",), field[:, None]),
        "consumption_model": SensorWindow(times, ("zone",), model[:, None]),
    }


@pytest.mark.timeout(30)
def test_a_burst_is_measured_in_the_scenarios_metrics() -> None:
    detector = WaterLeakDetector(step_s=STEP).fit(metered(4, seed=1))
    onset = 50
    events = detector.predict(metered(1, surge=0.3, drop=0.8 * SIGNATURES[1], onset=onset, seed=2))
    event = events[0]
    assert onset * STEP <= event.detected_at_s <= (onset + 4) * STEP
    drops = [m for m in event.measurements if m.metric == "pressureDropKpa"]
    # the loggers that dropped most, in kPa (9.80665 kPa per metre of water), largest first
    assert [m.sensor for m in drops] == ["c", "d", "b"]
    assert [m.sensor_index for m in drops] == [SENSORS.index("c"), SENSORS.index("d"), SENSORS.index("b")]
    assert drops[0].value == pytest.approx(0.8 * 9.80665, rel=0.1)
    assert {(m.unit_code, m.quantity) for m in drops} == {("KPA", "pressure")}
    (surge,) = [m for m in event.measurements if m.metric == "flowSurgePercent"]
    assert (surge.unit_code, surge.quantity, surge.sensor) == ("P1", "flow", None)
    assert surge.value == pytest.approx(30.0, abs=3.0)  # the supply rose by 30 % of what the model expects
    assert event.severity == "warning"
    assert event.rule is not None
    assert f"past the detector's threshold {detector.threshold:g}" in event.rule
