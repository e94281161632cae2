"""The scenario runner: one spec per kind, from Python and from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from citynerve.models.incidents import CollectingSink
from citynerve.workloads.runner import SpecError, main, run_scenario
from citynerve.workloads.sim.drainage import DrainageScenarioSpec, StormSpec, simulate_drainage
from citynerve.workloads.sim.water import graph_distances, water_placement

ANCHOR = {"latitude": 31.2304, "longitude": 121.4737, "name": "the centre of Shanghai"}


@pytest.mark.timeout(120)
def test_water_burst_drill_emits_a_located_incident(ray_local: None) -> None:
    sink = CollectingSink()
    spec = {
        "kind": "water-burst",
        "mode": "drill",
        "fleets": ["net3-pressure"],
        "models": ["leak-cusum"],
        "simulation": {"network": "Net3", "leaks": [{"node": "207", "area_m2": 0.01, "start_s": 36000}],
                       "anchor": ANCHOR},
    }
    summary = run_scenario(spec, sink)
    assert summary["detections"] >= 1
    event = sink.events[0]
    assert event.kind == "water-burst"
    assert event.detected_at_s >= 36000
    assert event.evidence["scenario"]["fleets"] == ["net3-pressure"]
    # what the drill knows: how far, along the pipes, the reported junction is from the burst
    assert event.truth is not None
    hops, metres = graph_distances("Net3", "207", [event.location.asset_id])
    assert (event.truth.true_asset, event.truth.hops, event.truth.distance_m) == ("207", hops[0], metres[0])
    # the asset's coordinates, from the network placed at the anchor
    placement = water_placement("Net3", (ANCHOR["latitude"], ANCHOR["longitude"]), ANCHOR["name"])
    assert (event.location.lat, event.location.lon) == placement.locate(event.location.asset_id)
    assert event.location.placement == placement.describe(f"junction {event.location.asset_id}")
    assert {m.metric for m in event.measurements} == {"pressureDropKpa", "flowSurgePercent"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("kind", "simulation", "expect"),
    [
        ("urban-flood", {"peakIntensity": 2.0, "watchedNodes": ["10", "15"]}, "warnings"),
        ("mountain-flood", {"peakIntensity": 3.0, "stormDurationSeconds": 7200}, "prewarnings"),
        ("major-event", {"surge": {"peakFactor": 3.0}}, "alerts"),
    ],
)
def test_each_kind_runs_and_emits(kind: str, simulation: dict[str, Any], expect: str) -> None:
    sink = CollectingSink()
    summary = run_scenario({"kind": kind, "mode": "drill", "simulation": simulation}, sink)
    assert summary[expect] == len(sink.events) > 0
    assert {e.kind for e in sink.events} == {kind}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["urban-flood", "mountain-flood"])
def test_flood_warnings_say_whether_the_asset_flooded_and_where_it_is(kind: str) -> None:
    sink = CollectingSink()
    simulation = {"peakIntensity": 2.0, "anchor": ANCHOR}
    run_scenario({"kind": kind, "mode": "drill", "simulation": simulation}, sink)
    assert sink.events
    storm = simulate_drainage(DrainageScenarioSpec(storm=StormSpec(2.0)))
    for event in sink.events:
        assert event.truth is not None
        assert event.location.lat is not None
        assert event.location.lon is not None
        assert abs(event.location.lat - ANCHOR["latitude"]) < 0.01
        assert abs(event.location.lon - ANCHOR["longitude"]) < 0.01
        assert event.location.placement is not None
        assert "the centre of Shanghai" in event.location.placement
        if kind == "urban-flood":  # the same storm (seed 0) floods these nodes, and only these
            onset = storm.flood_onset_s(event.location.asset_id)
            assert event.truth.flooded is (onset is not None)
            assert event.truth.flood_onset_s == onset
        if event.truth.flooded:
            assert event.truth.flood_onset_s is not None
            assert event.truth.lead_time_s == event.truth.flood_onset_s - event.detected_at_s
        else:
            assert event.truth.lead_time_s is None
    if kind == "urban-flood":
        assert {e.truth.flooded for e in sink.events if e.truth} == {True, False}  # both are said


def test_bad_specs_are_refused_naming_the_field() -> None:
    with pytest.raises(SpecError, match=r"spec\.kind"):
        run_scenario({"kind": "volcano"}, CollectingSink())
    with pytest.raises(SpecError, match=r"spec\.mode"):
        run_scenario({"kind": "urban-flood", "mode": "rehearsal"}, CollectingSink())
    with pytest.raises(SpecError, match="thresholds"):
        run_scenario({"kind": "urban-flood", "thresholds": {"no_such_knob": 1}}, CollectingSink())


@pytest.mark.timeout(60)
def test_command_line_writes_incidents_as_json_lines(tmp_path: Path, ray_local: None) -> None:
    spec = tmp_path / "spec.json"
    spec.write_bytes(orjson.dumps({"kind": "urban-flood", "simulation": {"peakIntensity": 2.0}}))
    out = tmp_path / "incidents.jsonl"
    assert main(["--spec", str(spec), "--out", str(out)]) == 0
    lines = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert lines
    assert all(line["kind"] == "urban-flood" for line in lines)
    bad = tmp_path / "bad.json"
    bad.write_bytes(orjson.dumps({"kind": "volcano"}))
    assert main(["--spec", str(bad)]) == 2
