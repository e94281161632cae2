"""The duty officer's report page, built from Incidents as the API serves them and scenario runs as
MLflow holds them (pure: the page builder reads nothing and simulates nothing)."""

from __future__ import annotations

import itertools
import json
import re
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from citynerve.models.incidents import CollectingSink, IncidentEvent
from citynerve.models.scenario_runs import ScenarioRunRecord, run_page_url, summary_metrics
from citynerve.operators.city.config import ANNOTATION_MLFLOW_RUN
from citynerve.operators.demo.report import (
    SEVERITY_RANK,
    DemoResult,
    build_page,
    incident_record,
    runs_named_by,
    time_ticks,
    write_report,
)
from citynerve.workloads.runner import run_scenario

MLFLOW = "http://127.0.0.1:5000"
MAP = "http://127.0.0.1:8080/"
FLOOD_THRESHOLDS = [
    {"metric": "waterLevelMm", "unitCode": "MMT", "warning": 150, "alarm": 270},
    {"metric": "rainfallIntensityMmPerHour", "unitCode": "H67", "warning": 30, "alarm": 50},
]


class Page(HTMLParser):
    """Elements of a page as (tag, attributes, text inside up to the next tag)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], list[str]]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}, []))

    def handle_data(self, data: str) -> None:
        if self.elements:
            self.elements[-1][2].append(data)

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a, _ in self.elements if t == tag and all(a.get(k) == v for k, v in attrs.items())]

    def text_of(self, tag: str, **attrs: str) -> str:
        return next(
            "".join(d)
            for t, a, d in self.elements
            if t == tag and all(a.get(k) == v for k, v in attrs.items())
        )


def _incident(
    city: str, scenario: str, event: IncidentEvent, run_id: str, at: datetime, n: int
) -> dict[str, Any]:
    """An Incident as a city's API server serves it, for one detection of a recorded run."""
    stamp = at.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "metadata": {
            "name": f"{scenario}-{n:03d}",
            "namespace": "citynerve",
            "annotations": {ANNOTATION_MLFLOW_RUN: run_id},
        },
        "spec": {
            "kind": event.kind,
            "severity": event.severity,
            "drill": True,
            "state": "Detected",
            "detectedAt": stamp,
            "location": {"assetId": event.location.asset_id},
            "evidence": [
                {"metric": "simulatedMinute", "value": str(event.detected_at_s / 60), "unitCode": "MIN"}
            ],
        },
        "status": {},
    }


def _run(
    kind: str, simulation: dict[str, Any], thresholds: list[dict[str, Any]], run_id: str, city: str
) -> tuple[ScenarioRunRecord, list[IncidentEvent]]:
    """A real drill of ``kind`` and the record its workload would leave in MLflow."""
    sink = CollectingSink()
    summary = run_scenario({"kind": kind, "mode": "drill", "simulation": simulation}, sink)
    series = {"thresholds": thresholds, **summary.pop("series")}
    params = {
        "city": city,
        "scenario": f"{kind}-drill",
        "kind": kind,
        "mode": "drill",
        "revision": "abcdef1234",
    }
    return ScenarioRunRecord(run_id, "7", "FINISHED", params, summary_metrics(summary), series), sink.events


@pytest.fixture(scope="module")
def result() -> DemoResult:
    flood_run, flood_events = _run("urban-flood", {}, FLOOD_THRESHOLDS, "f" * 32, "chengdu")
    crowd_run, crowd_events = _run("major-event", {"surge": {"peakFactor": 3.0}}, [], "c" * 32, "shanghai")
    at = datetime(2026, 12, 6, 1, 56, 35, tzinfo=UTC)
    incidents = {
        # every urban-flood warning in the same second, as a workload creates them
        "chengdu": [
            _incident("chengdu", "typhoon", e, flood_run.run_id, at, n) for n, e in enumerate(flood_events)
        ],
        "shanghai": [
            _incident("shanghai", "grand-prix", e, crowd_run.run_id, at + timedelta(seconds=4 + n), n)
            for n, e in enumerate(crowd_events)
        ],
    }
    runs = {r.run_id: r for r in (flood_run, crowd_run)}
    assert runs_named_by([i for items in incidents.values() for i in items]) == list(runs)
    records = [incident_record(city, i, runs) for city, items in incidents.items() for i in items]
    return DemoResult(
        incidents=records, runs=runs, mlflow_url=MLFLOW, situation_map=MAP, webhook_deliveries=3
    )


@pytest.fixture(scope="module")
def page(result: DemoResult) -> tuple[str, Page]:
    text = build_page(result)
    return text, Page(text)


@pytest.mark.timeout(60)
def test_incidents_are_a_table_sortable_by_severity_and_detection_time(
    result: DemoResult, page: tuple[str, Page]
) -> None:
    text, parsed = page
    assert "<pre" not in text
    assert parsed.find("table", id="incidents", **{"class": "sortable"})
    headers = re.findall(
        r'<th scope="col"><button type="button">([^<]+)</button></th>',
        text.split('id="incidents"')[1].split("</thead>")[0],
    )
    assert {"Severity", "Detected (UTC)"} <= set(headers)
    assert 'addEventListener("click"' in text  # the page sorts itself, offline
    rows = text.split('<table id="incidents"')[1].split("</table>")[0].split("<tr data-name=")[1:]
    assert len(rows) == len(result.incidents)
    column = headers.index("Severity")
    severity_keys = [int(re.findall(r'<td data-sort="([^"]*)"', row)[column]) for row in rows]
    assert severity_keys == sorted(severity_keys, reverse=True)  # most severe first
    assert severity_keys == sorted(SEVERITY_RANK[i.severity] for i in result.incidents)[::-1]
    detected = headers.index("Detected (UTC)")
    times = [re.findall(r'<td data-sort="([^"]*)"', row)[detected] for row in rows]
    assert sorted(times) == sorted(i.detected_at for i in result.incidents)


@pytest.mark.timeout(60)
def test_every_incident_is_drawn_in_the_colour_its_legend_gives_its_kind(
    result: DemoResult, page: tuple[str, Page]
) -> None:
    _, parsed = page
    markers = parsed.find("g", **{"class": "incident"})
    assert sorted(m["data-name"] for m in markers) == sorted(i.name for i in result.incidents)
    legend = {g["data-kind"]: g["data-colour"] for g in parsed.find("g", **{"class": "legend-kind"})}
    assert set(legend) == {i.kind for i in result.incidents}
    assert len(set(legend.values())) == len(legend)  # one colour per kind
    fills = [a["fill"] for t, a, _ in parsed.elements if a.get("class") == "marker"]
    assert len(fills) == len(markers)
    for marker, fill in zip(markers, fills, strict=True):
        assert fill == marker["data-colour"] == legend[marker["data-kind"]]
    swatches = [a["fill"] for t, a, _ in parsed.elements if t == "rect" and a.get("width") == "12"]
    assert swatches == [legend[k] for k in sorted(legend)]
    # incidents detected in the same second are stacked, not drawn on top of each other
    marker = r'class="marker" (?:cx="([\d.]+)" cy="([\d.]+)"|d="M([\d.]+),([\d.]+))'
    positions = re.findall(marker, build_page(result))
    assert len(set(positions)) == len(result.incidents)


@pytest.mark.timeout(60)
def test_the_timeline_has_a_time_axis(result: DemoResult, page: tuple[str, Page]) -> None:
    text, _ = page
    ticks = [
        (float(x), datetime.fromisoformat(t))
        for x, t in re.findall(r'<text class="tick" x="([\d.]+)"[^>]*data-time="([^"]+)"', text)
    ]
    assert len(ticks) >= 3
    assert [t for _, t in ticks] == sorted(t for _, t in ticks)
    # x is linear in time: equal steps of time are equal steps on the page
    steps = {round(b[0] - a[0], 1) for a, b in itertools.pairwise(ticks)}
    assert max(steps) - min(steps) <= 0.2
    first, last = min(i.detected_at for i in result.incidents), max(i.detected_at for i in result.incidents)
    assert ticks[0][1] <= datetime.fromisoformat(last)
    assert ticks[-1][1] >= datetime.fromisoformat(first)
    assert (
        time_ticks(datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, 0, 0, 50, tzinfo=UTC))[1].second
        == 10
    )


@pytest.mark.timeout(60)
def test_the_flood_plot_is_a_node_that_flooded_in_the_scenarios_unit(
    result: DemoResult, page: tuple[str, Page]
) -> None:
    text, _ = page
    data = json.loads(re.search(r'<script type="application/json" id="data-flood">(.*?)</script>', text)[1])
    run = result.runs[data["run"]]
    trace = next(t for t in run.series["traces"] if t["id"] == data["node"])
    assert "floodOnset" in trace["marks"]  # the node flooded in the recorded run
    assert data["floodOnsetH"] == trace["marks"]["floodOnset"] / 3600
    assert data["unit"] == "mm"
    assert run.series["unit"] == "m"
    assert data["values"] == [None if v is None else round(v * 1000, 6) for v in trace["values"]]
    assert data["thresholds"] == [150, 270]  # the Scenario's warning and alarm, in its unit
    warned = next(i for i in result.incidents if i.asset == data["node"] and i.kind == "urban-flood")
    assert warned.simulated_minute is not None
    assert data["warnedH"] == warned.simulated_minute / 60
    assert warned.flooded is True
    assert warned.lead_time_min == trace["marks"]["floodOnset"] / 60 - warned.simulated_minute
    assert "Scenario warning: waterLevelMm 150 mm" in text
    assert "(ft)" not in text


@pytest.mark.timeout(60)
def test_incidents_link_their_mlflow_run_and_the_page_links_the_map(
    result: DemoResult, page: tuple[str, Page], tmp_path: Path
) -> None:
    text, parsed = page
    links = [a["href"] for a in parsed.find("a", **{"class": "mlflow-run"})]
    expected = {run_page_url(MLFLOW, r.experiment_id, r.run_id) for r in result.runs.values()}
    assert set(links) == expected
    assert links.count(run_page_url(MLFLOW, "7", "f" * 32)) >= sum(
        1 for i in result.incidents if i.kind == "urban-flood"
    )
    assert parsed.find("a", id="situation-map", href=MAP)
    assert write_report(result, tmp_path).read_text() == text


@pytest.mark.timeout(60)
def test_a_run_not_recorded_says_so(result: DemoResult) -> None:
    bare = DemoResult(
        incidents=[
            incident_record(
                i.city,
                {
                    "metadata": {"name": i.name},
                    "spec": {
                        "kind": i.kind,
                        "severity": i.severity,
                        "location": {"assetId": i.asset},
                        "detectedAt": i.detected_at,
                        "state": i.state,
                    },
                },
                {},
            )
            for i in result.incidents[:2]
        ]
    )
    text = build_page(bare)
    assert "not recorded" in text
    assert "No scenario run was recorded in MLflow" in text
    assert 'class="mlflow-run"' not in text
