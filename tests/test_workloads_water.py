"""Water-burst detection on simulated networks: the quality figures, with agreed floors."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import wntr
from citynerve.workloads.sim.water import (
    LeakSpec,
    WaterScenarioSpec,
    choose_sensors,
    graph_distances,
    model_baseline,
    network_path,
    run_water_scenarios,
    simulate_water,
    water_placement,
)
from citynerve.workloads.water import evaluate_water_detection, leak_set

# Floors sit a little below what was measured on this machine (see bench/README.md), for
# leaks and bursts of 5 to 200 cm2: Net3 11/12 detected, median delay 45 min, median 2 hops;
# ky4 12/12, 45 min, 7.5 hops; no false alarm in 6 leak-free days and the pre-onset hours.
FLOORS = {
    "Net3": {"rate": 0.8, "delay_min": 90.0, "hops": 4.0, "false_per_day": 0.5},
    "ky4": {"rate": 0.8, "delay_min": 90.0, "hops": 12.0, "false_per_day": 0.5},
}


@pytest.mark.timeout(20)
def test_leak_opens_at_onset_and_draws_water() -> None:
    spec = WaterScenarioSpec(network="Net3", leaks=(LeakSpec(node="123", area_m2=0.003, start_s=10 * 3600),))
    run = simulate_water(spec)
    onset = int(np.searchsorted(run.times_s, 10 * 3600))
    assert np.all(run.leak_flow[:onset] < 1e-6)
    # orifice law: Q = Cd·A·√(2gh), with h some tens of metres on Net3
    assert 0.03 < run.leak_flow[onset] < 0.15
    base = model_baseline(spec)
    assert np.nanmean(run.pressure[onset:] - base.pressure[onset:]) < np.nanmean(
        run.pressure[:onset] - base.pressure[:onset]
    )


@pytest.mark.timeout(20)
def test_a_mid_pipe_burst_splits_the_pipe() -> None:
    spec = WaterScenarioSpec(
        network="Net3", leaks=(LeakSpec(node="121", pipe="121", area_m2=0.005, start_s=36000),)
    )
    run = simulate_water(spec)
    assert run.leak_flow.max() > 0.05
    assert run.leak_flow[run.times_s < 36000].max() < 1e-6


@pytest.mark.timeout(20)
def test_missing_readings_and_noise_follow_the_spec() -> None:
    spec = WaterScenarioSpec(network="Net3", missing_rate=0.2, seed=4)
    run = simulate_water(spec)
    share = float(np.isnan(run.pressure).mean())
    assert 0.12 < share < 0.28
    readings = run.readings()
    assert set(np.unique(readings.prop)) == {"pressure", "flow"}
    assert len(readings) == run.pressure.size + run.flow.size


@pytest.mark.timeout(60)
def test_parallel_runs_on_ray_do_not_clash(ray_local: None) -> None:
    base = WaterScenarioSpec(network="Net3", sensors=choose_sensors("Net3"))
    specs = [replace(base, seed=s, leaks=(LeakSpec("123", 0.002 * (s + 1), 36000),)) for s in range(6)]
    runs = run_water_scenarios(specs)
    local = [simulate_water(s) for s in specs[:2]]
    for parallel, alone in zip(runs[:2], local, strict=True):
        np.testing.assert_array_equal(parallel.pressure, alone.pressure)
    flows = [r.leak_flow.max() for r in runs]
    assert flows == sorted(flows)  # bigger orifice, more water: no run read another's files


@pytest.mark.timeout(240)
@pytest.mark.parametrize("network", ["Net3", "ky4"])
def test_detection_quality(network: str, ray_local: None, capsys: pytest.CaptureFixture[str]) -> None:
    leaks = leak_set(network, 12, seed=1)
    report = evaluate_water_detection(WaterScenarioSpec(network=network), leaks, clean_days=6)
    figures = report.figures()
    with capsys.disabled():
        print(f"\nwater detection {network}: {json.dumps(figures)}")  # noqa: T201 - the figures are the report
    floor = FLOORS[network]
    assert report.scenarios == 12
    assert report.detection_rate >= floor["rate"]
    assert report.median_delay_min <= floor["delay_min"]
    assert report.median_localisation_hops <= floor["hops"]
    assert report.false_alarms_per_day <= floor["false_per_day"]


def _metres_between(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle distance (haversine, mean Earth radius) between two (lat, lon) points."""
    lat1, lon1, lat2, lon2 = map(np.radians, (a[0], a[1], b[0], b[1]))
    h = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return float(2 * 6_371_000.0 * np.arcsin(np.sqrt(h)))


@pytest.mark.timeout(30)
def test_a_drill_network_is_placed_in_the_city_at_the_scale_of_its_pipes() -> None:
    wn = wntr.network.WaterNetworkModel(str(network_path("Net3")))
    anchor = (31.2304, 121.4737)
    placement = water_placement("Net3", anchor, "the centre of Shanghai")
    # on the ground, a pipe is at least as long as the straight line between its ends, and
    # half the pipes are longer than that line (the scale is the median of the ratios)
    ratios = []
    for _name, pipe in wn.pipes():
        a, b = placement.locate(pipe.start_node_name), placement.locate(pipe.end_node_name)
        assert a is not None
        assert b is not None
        straight = _metres_between(a, b)
        if straight > 0:
            ratios.append(pipe.length / straight)
    assert np.median(ratios) == pytest.approx(1.0, rel=0.01)
    xy = np.array([wn.get_node(n).coordinates for n in wn.node_name_list])
    middle = placement.place(*((xy.min(axis=0) + xy.max(axis=0)) / 2))
    assert _metres_between(middle, anchor) < 0.5
    assert placement.locate("no-such-junction") is None
    assert "1 unit = 225 m" in placement.describe("junction 125")


@pytest.mark.timeout(30)
def test_graph_distances_count_pipes_and_their_metres() -> None:
    wn = wntr.network.WaterNetworkModel(str(network_path("Net3")))
    pipe = wn.get_link(wn.pipe_name_list[10])
    hops, metres = graph_distances("Net3", pipe.start_node_name, [pipe.start_node_name, pipe.end_node_name])
    assert hops.tolist() == [0.0, 1.0]
    assert metres[0] == 0.0
    assert metres[1] <= pipe.length  # a parallel path may be shorter, never longer
