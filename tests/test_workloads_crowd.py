"""Major events: replayed Auckland pedestrian counts, with and without an event surge."""

from __future__ import annotations

import numpy as np
import pytest
from citynerve.models.detectors.base import SensorWindow, Window
from citynerve.models.detectors.crowd import CrowdCongestionDetector
from citynerve.workloads.sim.crowd import DEFAULT_SITES, CrowdRun, SurgeSpec, replay

HISTORY_START, EVENT_START = "2024-06-03", "2024-08-05"
SURGE = SurgeSpec(sites=DEFAULT_SITES[:4], start_h=5 * 24 + 15, peak_factor=3.0)  # a Saturday afternoon


def window(run: CrowdRun, history: CrowdRun) -> Window:
    offset = (run.start - history.start).total_seconds()
    return {"peopleCount": SensorWindow(run.times_s + offset, run.sites, run.counts)}


@pytest.fixture(scope="module")
def fitted() -> tuple[CrowdRun, CrowdCongestionDetector]:
    history = replay(HISTORY_START, 56)
    detector = CrowdCongestionDetector(locations=history.locations)
    return history, detector.fit(window(history, history))


@pytest.mark.timeout(30)
def test_replay_is_real_counts_and_the_surge_only_touches_its_sites() -> None:
    normal = replay(EVENT_START, 14)
    surged = replay(EVENT_START, 14, surge=SURGE)
    assert normal.counts.shape == (14 * 24, len(DEFAULT_SITES))
    assert np.nanmax(normal.counts) > 500  # Queen Street at lunchtime
    others = [j for j, s in enumerate(DEFAULT_SITES) if s not in SURGE.sites]
    np.testing.assert_array_equal(normal.counts[:, others], surged.counts[:, others])
    assert np.nansum(surged.counts) > np.nansum(normal.counts)
    assert surged.readings().prop[0] == "peopleCount"


@pytest.mark.timeout(30)
def test_congestion_alert_fires_on_the_surge(fitted: tuple[CrowdRun, CrowdCongestionDetector]) -> None:
    history, detector = fitted
    surged = replay(EVENT_START, 14, surge=SURGE)
    events = detector.predict(window(surged, history))
    assert events
    assert {e.location.asset_id for e in events} <= set(SURGE.sites)
    offset = (surged.start - history.start).total_seconds()
    surge_start = offset + SURGE.start_h * 3600.0
    surge_end = surge_start + (2 * SURGE.ramp_h + SURGE.plateau_h) * 3600.0
    assert all(surge_start <= e.detected_at_s <= surge_end for e in events)
    assert events[0].location.lat is not None
    assert "forecast_next" in detector.explain(events[0])


@pytest.mark.timeout(30)
def test_no_alert_on_the_normal_replay(fitted: tuple[CrowdRun, CrowdCongestionDetector]) -> None:
    history, detector = fitted
    assert detector.predict(window(replay(EVENT_START, 14), history)) == []


@pytest.mark.timeout(30)
def test_forecast_carries_a_surge_forward(fitted: tuple[CrowdRun, CrowdCongestionDetector]) -> None:
    history, detector = fitted
    surged = replay(EVENT_START, 14, surge=SURGE)
    normal = replay(EVENT_START, 14)
    hour = SURGE.start_h + SURGE.ramp_h
    assert np.all(
        detector.forecast(window(surged, history))[hour, :4]
        > detector.forecast(window(normal, history))[hour, :4]
    )
