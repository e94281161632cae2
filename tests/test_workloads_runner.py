"""The scenario runner: one spec per kind, from Python and from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from citynerve.models.incidents import CollectingSink
from citynerve.workloads.runner import SpecError, main, run_scenario


@pytest.mark.timeout(120)
def test_water_burst_drill_emits_a_located_incident(ray_local: None) -> None:
    sink = CollectingSink()
    spec = {
        "kind": "water-burst",
        "mode": "drill",
        "fleets": ["net3-pressure"],
        "models": ["leak-cusum"],
        "simulation": {"network": "Net3", "leaks": [{"node": "207", "area_m2": 0.01, "start_s": 36000}]},
    }
    summary = run_scenario(spec, sink)
    assert summary["detections"] >= 1
    event = sink.events[0]
    assert event.kind == "water-burst"
    assert event.detected_at_s >= 36000
    assert event.evidence["scenario"]["fleets"] == ["net3-pressure"]


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
