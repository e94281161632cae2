"""The water leak detector and localiser on synthetic windows (no hydraulic simulation)."""

from __future__ import annotations

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
