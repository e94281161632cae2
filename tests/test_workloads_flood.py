"""Urban and mountain flood: storms written into SWMM models, warnings ahead of the water."""

from __future__ import annotations

import numpy as np
import pytest
from citynerve.models.detectors.base import SensorWindow, Window
from citynerve.models.detectors.flood import UrbanFloodWarning
from citynerve.models.detectors.mountain import Area, MountainFloodWarning
from citynerve.workloads.sim.drainage import (
    DrainageRun,
    DrainageScenarioSpec,
    StormSpec,
    critical_levels,
    drainage_placement,
    model_path,
    model_units,
    simulate_drainage,
)

WATCHED = ("10", "15", "21")  # the low points of SWMM's Example 1 catchment


def window(run: DrainageRun) -> Window:
    return {
        "currentLevel": SensorWindow(run.times_s, run.nodes, run.level),
        "precipitation": SensorWindow(run.times_s, run.gauges, run.rainfall),
        "flow": SensorWindow(run.times_s, run.catchments, run.runoff),
    }


@pytest.fixture(scope="module")
def dry() -> DrainageRun:
    return simulate_drainage(DrainageScenarioSpec(storm=StormSpec(0.0), watched_nodes=WATCHED))


@pytest.mark.timeout(20)
def test_the_storm_is_the_models_rainfall_and_the_original_is_untouched() -> None:
    before = model_path("model_lids").read_bytes()
    storm = StormSpec(peak_intensity=2.0)
    run = simulate_drainage(DrainageScenarioSpec(storm=storm, watched_nodes=WATCHED))
    assert model_path("model_lids").read_bytes() == before
    # SWMM reports the gauge's intensity over the 5-minute interval just ended
    expected = storm.intensity(run.times_s - 300.0)
    np.testing.assert_allclose(run.rainfall[:, 0], expected, atol=1e-3)
    assert {"currentLevel", "precipitation"} <= set(np.unique(run.readings().prop))


@pytest.mark.timeout(20)
def test_pump_status_is_reported_where_the_model_has_pumps() -> None:
    run = simulate_drainage(DrainageScenarioSpec(model="model_full_features", storm=StormSpec(1.0)))
    assert run.pumps == ("C2",)
    assert set(np.unique(run.pump_on)) <= {0.0, 1.0}
    assert "value" in set(np.unique(run.readings().prop))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("peak", [1.0, 2.0, 3.0])
def test_warning_comes_before_the_underpass_floods(
    peak: float, dry: DrainageRun, capsys: pytest.CaptureFixture[str]
) -> None:
    run = simulate_drainage(DrainageScenarioSpec(storm=StormSpec(peak), watched_nodes=WATCHED, seed=3))
    onset = run.flood_onset_s("10")
    assert onset is not None, "the storm must flood the watched underpass for this test to mean anything"
    detector = UrbanFloodWarning(critical_levels("model_lids", WATCHED), step_s=300).fit(window(dry))
    warned = {e.location.asset_id: e for e in detector.predict(window(run))}
    lead = onset - warned["10"].detected_at_s
    with capsys.disabled():
        print(f"\nurban flood, storm peak {peak} in/h: underpass 10 warned {lead / 60:.0f} min ahead")  # noqa: T201 - the figures are the report
    assert lead > 0
    assert detector.explain(warned["10"])["horizon_s"] == 1800.0


@pytest.mark.timeout(30)
def test_no_warning_in_dry_weather(dry: DrainageRun) -> None:
    again = simulate_drainage(DrainageScenarioSpec(storm=StormSpec(0.0), watched_nodes=WATCHED, seed=9))
    detector = UrbanFloodWarning(critical_levels("model_lids", WATCHED), step_s=300).fit(window(dry))
    assert detector.predict(window(again)) == []


@pytest.mark.timeout(90)
def test_mountain_flood_predict_prewarn_rehearse_preplan(capsys: pytest.CaptureFixture[str]) -> None:
    calibration = simulate_drainage(DrainageScenarioSpec(storm=StormSpec(1.0)))
    peaks = calibration.runoff.max(axis=0)
    areas = [
        Area(c, f"village-{c}", 1.2 * q, 1.8 * q, lon=121.0 + i / 100, lat=31.0)
        for i, (c, q) in enumerate(zip(calibration.catchments, peaks, strict=True))
    ]
    detector = MountainFloodWarning(areas, step_s=300)
    detector.fit(
        window(calibration), dict(zip(calibration.catchments, calibration.catchment_area, strict=True))
    )
    drills = {
        f"peak-{p}": window(
            simulate_drainage(DrainageScenarioSpec(storm=StormSpec(p, duration_s=7200), seed=1))
        )
        for p in (2.0, 3.0)
    }
    outcomes = detector.rehearse(drills)
    exceeded = [o for o in outcomes if o.exceeded_at_s is not None]
    leads = [o.lead_time_s for o in exceeded]
    with capsys.disabled():
        minutes = [lt / 60 for lt in leads if lt is not None]
        print(f"\nmountain flood drill: {len(exceeded)} exceedances, lead (min) {minutes}")  # noqa: T201 - the figures are the report
    assert exceeded, "the drill storms must push some stream past its warning level"
    assert all(lt is not None and lt > 0 for lt in leads)  # every exceedance pre-warned, ahead
    plan = detector.preplan(drills["peak-3.0"])
    assert plan
    assert plan == sorted(plan, key=lambda p: p["evacuate_from_s"])
    events = detector.predict(drills["peak-3.0"])
    assert {e.kind for e in events} == {"mountain-flood"}
    assert detector.explain(events[0])["params"] is not None


@pytest.mark.timeout(60)
def test_warnings_are_measured_in_millimetres_from_the_models_own_units(dry: DrainageRun) -> None:
    units = model_units("model_lids")
    assert (units.flow_units, units.metres_per_length, units.mm_per_hour_per_rain) == ("CFS", 0.3048, 25.4)
    run = simulate_drainage(DrainageScenarioSpec(storm=StormSpec(2.0), watched_nodes=WATCHED, seed=3))
    detector = UrbanFloodWarning(critical_levels("model_lids", WATCHED), step_s=300,
                                 mm_per_unit=304.8, rain_mm_per_hour_per_unit=25.4).fit(window(dry))
    events = detector.predict(window(run))
    assert events
    for event in events:
        t = int(np.flatnonzero(run.times_s == event.detected_at_s)[0])
        j = run.nodes.index(event.location.asset_id)
        measured = {m.metric: m for m in event.measurements}
        assert measured["waterLevelMm"].value == pytest.approx(run.level[t, j] * 304.8)
        assert (measured["waterLevelMm"].sensor, measured["waterLevelMm"].sensor_index) == (run.nodes[j], j)
        assert measured["forecastWaterLevelMm"].value >= measured["drainFullLevelMm"].value or (
            event.evidence["trigger"] == "level")
        assert measured["rainfallIntensityMmPerHour"].value == pytest.approx(run.rainfall[t].max() * 25.4)
        assert event.rule is not None
        assert "drain-full level" in event.rule


@pytest.mark.timeout(30)
def test_a_swmm_model_is_placed_in_the_city_nodes_and_subcatchments() -> None:
    anchor = (30.5728, 104.0668)
    placement = drainage_placement("model_lids", anchor, "the centre of Chengdu")
    run = simulate_drainage(DrainageScenarioSpec(storm=StormSpec(0.0)))
    points = [placement.locate(n) for n in run.nodes] + [
        placement.locate(f"subcatchment:{c}") for c in run.catchments]
    assert None not in points
    lats = [p[0] for p in points if p is not None]
    lons = [p[1] for p in points if p is not None]
    # Example 1 is a catchment of about 480 m by 660 m: its assets lie within 0.01 degree of the anchor
    assert max(abs(lat - anchor[0]) for lat in lats) < 0.01
    assert max(abs(lon - anchor[1]) for lon in lons) < 0.01
    assert len(set(points)) == len(points)  # every asset has a place of its own
