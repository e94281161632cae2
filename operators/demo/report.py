"""The duty officer's report: one HTML page of what happened in a run, from where each figure lives.

* Incidents (each city's API server): kind, severity, asset, detection time, lifecycle, drill flag,
  simulated timing from their evidence, and the MLflow run named by ``citynerve.io/mlflow-run-id``.
* The recorded scenario runs (MLflow, ``citynerve.models.scenario_runs``): parameters, metrics and
  the series the detector scored, which the plots draw and the flood lead times come from.
* City status on the hub, ModelPromotion outcomes, and what the demo timed itself.

Nothing here simulates anything: ``incident_record`` and ``build_page`` are pure functions of what
was read. The page has no external resources: figures are inline SVG, sorting a few lines of script.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from citynerve.models.scenario_runs import ScenarioRunRecord, run_page_url
from citynerve.operators.city.config import ANNOTATION_MLFLOW_RUN
from citynerve.operators.cli import format_table

# One colour per kind (Okabe-Ito: distinguishable with the common colour-vision deficiencies).
KIND_COLOURS = {
    "water-burst": "#0072B2",
    "urban-flood": "#009E73",
    "mountain-flood": "#E69F00",
    "major-event": "#CC79A7",
}
OTHER_COLOUR = "#555555"
SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
# UN/CEFACT length codes a Scenario's thresholds use, in metres.
LENGTH_UNITS = {"MMT": (0.001, "mm"), "CMT": (0.01, "cm"), "MTR": (1.0, "m")}
_TRACE_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9")


@dataclass
class IncidentRecord:
    """One Incident as its city's API server holds it, with the lead time its run recorded."""

    city: str
    name: str
    kind: str
    severity: str
    asset: str
    detected_at: str
    state: str
    drill: bool = False
    simulated_minute: float | None = None
    detection_delay_min: float | None = None
    lead_time_min: float | None = None
    flooded: bool | None = None  # urban flood: whether the warned node flooded in the recorded run
    dispatch_s: int | None = None
    response_s: int | None = None
    resolution_s: int | None = None
    during_cut: bool = False
    run_id: str | None = None


@dataclass
class DemoResult:
    """Everything the summary and the report show, each read back from where it lives."""

    clusters: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    incidents: list[IncidentRecord] = field(default_factory=list)
    promotions: list[dict[str, Any]] = field(default_factory=list)
    federation: list[dict[str, Any]] = field(default_factory=list)
    cut: dict[str, Any] = field(default_factory=dict)
    runs: dict[str, ScenarioRunRecord] = field(default_factory=dict)  # MLflow run id → record
    mlflow_url: str | None = None
    webhook_deliveries: int = 0
    situation_map: str | None = None


# --- reading an Incident -----------------------------------------------------------------------


def flood_truth(series: Mapping[str, Any], asset: str) -> tuple[bool | None, float | None]:
    """Whether ``asset`` flooded in a recorded urban-flood run, and when (simulated s); (None, None)
    when the run's series does not have the node."""
    for trace in series.get("traces") or []:
        if trace.get("id") == asset:
            onset = (trace.get("marks") or {}).get("floodOnset")
            return onset is not None, onset
    return None, None


def runs_named_by(incidents: Sequence[Mapping[str, Any]]) -> list[str]:
    """The MLflow runs Incidents name (annotation ``citynerve.io/mlflow-run-id``), each once, in order."""
    named = ((i["metadata"].get("annotations") or {}).get(ANNOTATION_MLFLOW_RUN) for i in incidents)
    return list(dict.fromkeys(r for r in named if r))


def incident_record(
    city: str,
    incident: Mapping[str, Any],
    runs: Mapping[str, ScenarioRunRecord],
    during_cut: frozenset[str] | set[str] = frozenset(),
) -> IncidentRecord:
    """The report's row of one Incident (pure): spec and status as served, lead time from its run."""
    spec, status = incident["spec"], incident.get("status") or {}
    meta = incident["metadata"]
    timing = {
        e["metric"]: float(e["value"]) for e in spec.get("evidence") or [] if e.get("unitCode") == "MIN"
    }
    minute = timing.get("simulatedMinute")
    run_id = (meta.get("annotations") or {}).get(ANNOTATION_MLFLOW_RUN)
    asset = spec["location"].get("assetId", "")
    flooded: bool | None = None
    lead: float | None = None
    run = runs.get(run_id) if run_id else None
    if spec["kind"] == "urban-flood" and run is not None:
        flooded, onset = flood_truth(run.series, asset)
        if onset is not None and minute is not None:
            lead = onset / 60 - minute
    return IncidentRecord(
        city=city,
        name=meta["name"],
        kind=spec["kind"],
        severity=spec["severity"],
        asset=asset,
        detected_at=spec["detectedAt"],
        state=spec["state"],
        drill=bool(spec.get("drill")),
        simulated_minute=minute,
        detection_delay_min=timing.get("detectionDelayMinutes"),
        lead_time_min=lead,
        flooded=flooded,
        dispatch_s=status.get("dispatchSeconds"),
        response_s=status.get("responseSeconds"),
        resolution_s=status.get("resolutionSeconds"),
        during_cut=meta["name"] in during_cut,
        run_id=run_id,
    )


# --- terminal summary --------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}{unit}"


def _flooded(record: IncidentRecord) -> str:
    if record.flooded is None:
        return "-"
    return "flooded" if record.flooded else "did not flood"


def incident_table(incidents: Sequence[IncidentRecord]) -> str:
    rows = [
        (
            i.city,
            i.kind,
            i.severity,
            i.asset[:24],
            i.state,
            _fmt(i.detection_delay_min, 0, " min"),
            _fmt(i.lead_time_min, 0, " min"),
            _flooded(i),
            _fmt(i.dispatch_s, 0, " s"),
            _fmt(i.response_s, 0, " s"),
            _fmt(i.resolution_s, 0, " s"),
            "yes" if i.during_cut else "",
        )
        for i in ordered(incidents)
    ]
    return format_table(
        (
            "CITY",
            "KIND",
            "SEVERITY",
            "ASSET",
            "STATE",
            "DETECTION DELAY",
            "LEAD TIME",
            "NODE",
            "DISPATCH",
            "ON SITE",
            "RESOLVED",
            "DURING CUT",
        ),
        rows,
    )


def promotion_rows(result: DemoResult) -> list[tuple[Any, ...]]:
    """One row per promotion the demo ran: model, version, canary, outcome, cities, time taken."""
    return [(p["model"], p["version"], p["canary"], p["outcome"], ", ".join(p["cities"]),
             _fmt(p.get("seconds"), 1, " s")) for p in result.promotions]


def summary_text(result: DemoResult) -> str:
    """What the demo prints at its end (the report shows the same, and more)."""
    parts = ["INCIDENTS", incident_table(result.incidents), ""]
    if result.promotions:
        rows = promotion_rows(result)
        parts += [
            "PROMOTIONS",
            format_table(("MODEL", "VERSION", "CANARY", "OUTCOME", "CITIES", "TOOK"), rows),
            "",
        ]
    if result.federation:
        rows = [
            (c["city"], c["joined"], c["reachable"], c["ready"], c["sensors"], c["scenarios"], c["open"])
            for c in result.federation
        ]
        parts += [
            "FEDERATION (hub view)",
            format_table(
                ("CITY", "JOINED", "REACHABLE", "READY", "SENSORS ONLINE", "SCENARIOS", "OPEN INCIDENTS"),
                rows,
            ),
            "",
        ]
    if result.cut:
        parts += [cut_sentence(result.cut), ""]
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items())
    parts.append(f"Timings: {timings}")
    return "\n".join(parts)


def cut_sentence(cut: Mapping[str, Any]) -> str:
    return (
        f"Chengdu cut off for {cut['seconds']:.0f} s: marked unreachable after "
        f"{cut['marked_unreachable_s']:.1f} s (heartbeat timeout {cut['timeout_s']} s); "
        f"{cut['incidents_during']} incident(s) detected in Chengdu meanwhile; hub roll-up caught up "
        f"{cut['caught_up_s']:.1f} s after the link returned; nothing deleted "
        f"({cut['objects_before']} → {cut['objects_after']} propagated objects)."
    )


def ordered(incidents: Sequence[IncidentRecord]) -> list[IncidentRecord]:
    """Most severe first, then oldest first: the order a duty officer works through them."""
    return sorted(incidents, key=lambda i: (-SEVERITY_RANK.get(i.severity, 0), i.detected_at, i.name))


# --- figures (inline SVG) ------------------------------------------------------------------------


def kind_colour(kind: str) -> str:
    return KIND_COLOURS.get(kind, OTHER_COLOUR)


def _parse_time(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp).astimezone(UTC)


_TIME_STEPS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


def time_ticks(start: datetime, end: datetime, most: int = 8) -> list[datetime]:
    """Tick times on a round step (1 s … 1 day) between ``start`` and ``end``, at most ``most``."""
    span = max((end - start).total_seconds(), 1.0)
    step = next((s for s in _TIME_STEPS_S if span / s <= most), _TIME_STEPS_S[-1])
    epoch = math.ceil(start.timestamp() / step) * step
    ticks = []
    while epoch <= end.timestamp():
        ticks.append(datetime.fromtimestamp(epoch, UTC))
        epoch += step
    return ticks


def nice_ticks(low: float, high: float, most: int = 6) -> list[float]:
    """Round tick values covering [low, high] (1, 2 or 5 times a power of ten apart)."""
    if not math.isfinite(low) or not math.isfinite(high):
        return []
    if high <= low:
        high = low + 1.0
    raw = (high - low) / most
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    return [
        round(first + i * step, 10)
        for i in range(int((high - first) / step) + 2)
        if first + i * step <= high + step * 1e-9 and first + i * step >= low - step * 1e-9
    ]


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def timeline_svg(incidents: Sequence[IncidentRecord], width: int = 960) -> str:
    """Every incident at its detection time (UTC) on a time axis, one row per city, one colour per kind;
    incidents detected together are stacked so each is seen. Drills are diamonds, live ones circles."""
    if not incidents:
        return '<p class="empty">No incidents.</p>'
    times = [_parse_time(i.detected_at) for i in incidents]
    start, end = min(times), max(times)
    if (end - start).total_seconds() < 60:
        middle = start + (end - start) / 2
        start, end = middle - timedelta(seconds=30), middle + timedelta(seconds=30)
    left, right, top = 110, 20, 30
    plot_w = width - left - right
    span = (end - start).total_seconds()

    def x_of(t: datetime) -> float:
        return left + plot_w * (t - start).total_seconds() / span

    cities = sorted({i.city for i in incidents})
    placed: dict[str, list[tuple[float, IncidentRecord]]] = {c: [] for c in cities}
    for incident, t in sorted(zip(incidents, times, strict=True), key=lambda p: (p[1], p[0].name)):
        placed[incident.city].append((x_of(t), incident))
    stacks: dict[str, list[tuple[float, int, IncidentRecord]]] = {}
    for city, items in placed.items():
        column: list[tuple[float, int, IncidentRecord]] = []
        for x, incident in items:
            level = sum(1 for cx, _, _ in column if abs(cx - x) < 10)
            column.append((x, level, incident))
        stacks[city] = column
    row_h = {c: max(36, 12 * (1 + max(level for _, level, _ in stacks[c])) + 16) for c in cities}
    y0: dict[str, float] = {}
    y = float(top)
    for city in cities:
        y0[city] = y
        y += row_h[city]
    axis_y = y
    height = int(axis_y + 70)
    out = [
        f'<svg class="timeline" role="img" viewBox="0 0 {width} {height}" width="100%" '
        f'xmlns="http://www.w3.org/2000/svg"><title>Incidents by detection time (UTC), per city</title>'
    ]
    for city in cities:
        out.append(
            f'<text x="{left - 10}" y="{y0[city] + row_h[city] / 2 + 4:.1f}" '
            f'text-anchor="end">{_e(city)}</text>'
        )
        out.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y0[city] + row_h[city]:.1f}" '
            f'y2="{y0[city] + row_h[city]:.1f}" stroke="#ddd"/>'
        )
    ticks = time_ticks(start, end)
    step = (ticks[1] - ticks[0]).total_seconds() if len(ticks) > 1 else 60
    label = "%H:%M:%S" if step < 60 else "%H:%M"
    out.append(f'<line x1="{left}" x2="{width - right}" y1="{axis_y}" y2="{axis_y}" stroke="#333"/>')
    for tick in ticks:
        tx = x_of(tick)
        out.append(
            f'<line class="tick" x1="{tx:.1f}" x2="{tx:.1f}" y1="{top}" y2="{axis_y + 5}" stroke="#eee"/>'
        )
        out.append(
            f'<text class="tick" x="{tx:.1f}" y="{axis_y + 18}" text-anchor="middle" '
            f'data-time="{tick.isoformat()}">{tick.strftime(label)}</text>'
        )
    out.append(
        f'<text x="{left + plot_w / 2}" y="{axis_y + 36}" text-anchor="middle">'
        f"detection time, UTC, {start.strftime('%Y-%m-%d')}</text>"
    )
    for city in cities:
        base = y0[city] + row_h[city] - 12
        for x, level, incident in stacks[city]:
            cy = base - 12 * level
            colour = kind_colour(incident.kind)
            shape = (
                f'<path class="marker" d="M{x:.1f},{cy - 6:.1f} L{x + 6:.1f},{cy:.1f} L{x:.1f},{cy + 6:.1f} '
                f'L{x - 6:.1f},{cy:.1f} Z" fill="{colour}" stroke="#222" stroke-width="0.8"/>'
                if incident.drill
                else f'<circle class="marker" cx="{x:.1f}" cy="{cy:.1f}" r="5" fill="{colour}" '
                'stroke="#222" stroke-width="0.8"/>'
            )
            out.append(
                f'<g class="incident" data-name="{_e(incident.name)}" data-kind="{_e(incident.kind)}" '
                f'data-colour="{colour}" data-detected="{_e(incident.detected_at)}" '
                f'data-drill="{str(incident.drill).lower()}">'
                f"<title>{_e(incident.name)}: {_e(incident.kind)}, "
                f"{_e(incident.severity)}, {_e(incident.asset)}, detected {_e(incident.detected_at)}"
                f"{' (drill)' if incident.drill else ''}</title>{shape}</g>"
            )
    # legend: one entry per kind drawn, in the colour its markers have; then the two shapes
    lx, ly = left, axis_y + 56
    for kind in sorted({i.kind for i in incidents}):
        colour = kind_colour(kind)
        out.append(
            f'<g class="legend-kind" data-kind="{_e(kind)}" data-colour="{colour}">'
            f'<rect x="{lx}" y="{ly - 9}" width="12" height="12" fill="{colour}"/>'
            f'<text x="{lx + 16}" y="{ly + 1}">{_e(kind)}</text></g>'
        )
        lx += 30 + 8 * len(kind)
    out.append(
        f'<g class="legend-shape"><circle cx="{lx + 6}" cy="{ly - 3}" r="5" fill="none" stroke="#222"/>'
        f'<text x="{lx + 16}" y="{ly + 1}">live</text>'
        f'<path d="M{lx + 66},{ly - 9} L{lx + 72},{ly - 3} L{lx + 66},{ly + 3} L{lx + 60},{ly - 3} Z" '
        f'fill="none" stroke="#222"/><text x="{lx + 76}" y="{ly + 1}">drill (rehearsal)</text></g>'
    )
    out.append("</svg>")
    return "".join(out)


@dataclass(frozen=True)
class Line:
    """A series on a chart: x (hours) and y in the chart's unit; None where there was no value."""

    label: str
    x: Sequence[float]
    y: Sequence[float | None]


@dataclass(frozen=True)
class Rule:
    """A labelled horizontal (a level) or vertical (a moment) line."""

    label: str
    at: float
    colour: str
    dash: str = "6 3"


def chart_svg(
    title: str,
    x_label: str,
    y_label: str,
    lines: Sequence[Line],
    levels: Sequence[Rule] = (),
    moments: Sequence[Rule] = (),
    width: int = 960,
) -> str:
    """A line chart with labelled levels and moments, and a legend naming every line and rule."""
    xs = [x for line in lines for x in line.x] + [m.at for m in moments]
    ys = [y for line in lines for y in line.y if y is not None] + [r.at for r in levels]
    if not xs or not ys:
        return f'<p class="empty">{_e(title)}: nothing recorded to draw.</p>'
    x_ticks, y_ticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    x_lo, x_hi = min(x_ticks[0], *xs), max(x_ticks[-1], *xs)
    y_lo, y_hi = min(y_ticks[0], *ys), max(y_ticks[-1], *ys)
    legend_rows = len(lines) + len(levels) + len(moments)
    left, right, top, plot_h = 80, 20, 34, 260
    height = top + plot_h + 50 + 18 * legend_rows
    plot_w = width - left - right

    def px(x: float) -> float:
        return left + plot_w * (x - x_lo) / ((x_hi - x_lo) or 1.0)

    def py(y: float) -> float:
        return top + plot_h - plot_h * (y - y_lo) / ((y_hi - y_lo) or 1.0)

    out = [
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="100%" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{_e(title)}</title>',
        f'<text x="{left}" y="18" font-weight="bold">{_e(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>',
    ]
    out.extend(
        f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{top}" y2="{top + plot_h}" stroke="#eee"/>'
        f'<text x="{px(t):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{t:g}</text>'
        for t in x_ticks
    )
    out.extend(
        f'<line x1="{left}" x2="{left + plot_w}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>'
        f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:g}</text>'
        for t in y_ticks
    )
    out.append(
        f'<text x="{left + plot_w / 2}" y="{top + plot_h + 34}" text-anchor="middle">{_e(x_label)}</text>'
    )
    out.append(
        f'<text transform="translate(16 {top + plot_h / 2}) rotate(-90)" text-anchor="middle">'
        f"{_e(y_label)}</text>"
    )
    legend: list[tuple[str, str, str]] = []
    for n, line in enumerate(lines):
        colour = _TRACE_COLOURS[n % len(_TRACE_COLOURS)]
        segments: list[list[str]] = [[]]
        for x, y in zip(line.x, line.y, strict=True):
            if y is None:
                segments.append([])
            else:
                segments[-1].append(f"{px(x):.1f},{py(y):.1f}")
        out.extend(
            f'<polyline class="series" data-label="{_e(line.label)}" fill="none" '
            f'stroke="{colour}" stroke-width="1.6" points="{" ".join(points)}"/>'
            for points in segments
            if points
        )
        legend.append((colour, "", line.label))
    for rule in levels:
        out.append(
            f'<line class="level" x1="{left}" x2="{left + plot_w}" y1="{py(rule.at):.1f}" '
            f'y2="{py(rule.at):.1f}" stroke="{rule.colour}" stroke-dasharray="{rule.dash}"/>'
        )
        legend.append((rule.colour, rule.dash, rule.label))
    for rule in moments:
        out.append(
            f'<line class="moment" x1="{px(rule.at):.1f}" x2="{px(rule.at):.1f}" y1="{top}" '
            f'y2="{top + plot_h}" stroke="{rule.colour}" stroke-dasharray="{rule.dash}"/>'
        )
        legend.append((rule.colour, rule.dash, rule.label))
    ly = top + plot_h + 56
    for colour, dash, label in legend:
        out.append(
            f'<line x1="{left}" x2="{left + 28}" y1="{ly - 4}" y2="{ly - 4}" stroke="{colour}" '
            f'stroke-width="2" stroke-dasharray="{dash}"/><text x="{left + 36}" y="{ly}">{_e(label)}</text>'
        )
        ly += 18
    out.append("</svg>")
    return "".join(out)


@dataclass(frozen=True)
class Figure:
    """A figure of the report: its SVG, the values it plots (embedded on the page), what it says."""

    key: str
    caption: str
    svg: str
    data: Mapping[str, Any]


def _hours(series: Mapping[str, Any]) -> list[float]:
    return [t / 3600 for t in series.get("timesS") or []]


def _runs_of(result: DemoResult, kind: str) -> list[ScenarioRunRecord]:
    return [r for r in result.runs.values() if r.params.get("kind") == kind and r.series.get("traces")]


def _incidents_of(result: DemoResult, run: ScenarioRunRecord) -> list[IncidentRecord]:
    return [i for i in result.incidents if i.run_id == run.run_id]


def _source(run: ScenarioRunRecord, result: DemoResult) -> str:
    where = f"MLflow run {run.run_id}"
    return f"{where} ({run.url(result.mlflow_url)})" if result.mlflow_url else where


def water_figure(result: DemoResult) -> Figure | None:
    """Pressure residual at the loggers a burst's detection named, with the burst onset and the detection."""
    for run in _runs_of(result, "water-burst"):
        series = run.series
        hours = _hours(series)
        incidents = [i for i in _incidents_of(result, run) if i.simulated_minute is not None]
        lines = [Line(f"logger {t['id']}", hours, t["values"]) for t in series["traces"]]
        onsets = [
            Rule(f"burst onset at node {k.partition('@')[2]} (the drill's truth)", v / 3600, "#D55E00")
            for k, v in (series.get("marks") or {}).items()
            if k.startswith("burstOnset")
        ]
        detections = [
            Rule(f"detected: {i.name} ({i.severity})", (i.simulated_minute or 0) / 60, "#000000", "2 2")
            for i in incidents
        ]
        unit = series.get("unit", "")
        where = f"{series.get('source', '')}, {run.params.get('city')}"
        title = f"Pressure residual at the evidence loggers ({where})"
        data = {
            "run": run.run_id,
            "unit": unit,
            "timesH": hours,
            "traces": {t["id"]: t["values"] for t in series["traces"]},
            "onsetsH": [r.at for r in onsets],
            "detectedH": [r.at for r in detections],
        }
        caption = (
            f"{series.get('quantity', '')} in {unit} ({series.get('conversion', '')}); recorded in "
            f"{_source(run, result)}; detection times from the Incidents' simulatedMinute evidence."
        )
        svg = chart_svg(
            title,
            "simulated time (h since the drill's start)",
            f"residual ({unit})",
            lines,
            moments=[*onsets, *detections],
        )
        return Figure("water", caption, svg, data)
    return None


def _length_threshold(series: Mapping[str, Any]) -> tuple[Mapping[str, Any] | None, float, str]:
    """The Scenario's length threshold (e.g. waterLevelMm in MMT) and the plot's unit: metres per unit."""
    for threshold in series.get("thresholds") or []:
        unit = LENGTH_UNITS.get(str(threshold.get("unitCode")))
        if unit is not None:
            return threshold, unit[0], unit[1]
    return None, 1.0, "m"


def flood_figure(result: DemoResult) -> Figure | None:
    """Water depth at a node that flooded (one that was warned first when there is one), in the
    Scenario's length unit, against the Scenario's warning and alarm levels, with the flood onset."""
    for run in _runs_of(result, "urban-flood"):
        series = run.series
        if series.get("unit") != "m":
            continue
        flooded = [t for t in series["traces"] if "floodOnset" in (t.get("marks") or {})]
        if not flooded:
            continue
        incidents = {i.asset: i for i in _incidents_of(result, run)}
        trace = next((t for t in flooded if t["id"] in incidents), flooded[0])
        threshold, metres, unit = _length_threshold(series)
        scale = 1.0 / metres
        values = [None if v is None else round(v * scale, 6) for v in trace["values"]]
        levels = []
        if threshold is not None:
            for which, colour in (("warning", "#E69F00"), ("alarm", "#D55E00")):
                if threshold.get(which) is not None:
                    levels.append(
                        Rule(
                            f"Scenario {which}: {threshold['metric']} {threshold[which]} {unit}",
                            float(threshold[which]),
                            colour,
                        )
                    )
        full = (trace.get("levels") or {}).get("drainsFull")
        if full is not None:
            levels.append(
                Rule(
                    f"drains run full at {full * scale:g} {unit} (the detector's critical level)",
                    full * scale,
                    "#999999",
                    "2 4",
                )
            )
        marks = trace.get("marks") or {}
        moments = [
            Rule(
                f"flooding begins (SWMM) at {marks['floodOnset'] / 3600:.2f} h",
                marks["floodOnset"] / 3600,
                "#D55E00",
                "",
            )
        ]
        incident = incidents.get(trace["id"])
        warned_h = (
            incident.simulated_minute / 60
            if incident and incident.simulated_minute is not None
            else (marks["warned"] / 3600 if "warned" in marks else None)
        )
        if warned_h is not None:
            who = f"Incident {incident.name}" if incident else "the detector"
            moments.append(Rule(f"warned ({who}) at {warned_h:.2f} h", warned_h, "#000000", "2 2"))
        hours = _hours(series)
        title = f"Water depth at node {trace['id']} ({series.get('source', '')}), {run.params.get('city')}"
        data = {
            "run": run.run_id,
            "node": trace["id"],
            "unit": unit,
            "scale": scale,
            "timesH": hours,
            "values": values,
            "thresholds": [r.at for r in levels if r.label.startswith("Scenario")],
            "floodOnsetH": marks["floodOnset"] / 3600,
            "warnedH": warned_h,
        }
        caption = (
            f"Depth recorded in {_source(run, result)}, {series.get('conversion', '')}, shown in {unit} "
            + (
                f"(the unit of the Scenario's threshold {threshold['metric']}; x {scale:g} from m). "
                if threshold is not None
                else "(the Scenario states no length threshold). "
            )
            + f"{len(flooded)} of {len(series['traces'])} warned or flooded nodes flooded in this run."
        )
        svg = chart_svg(
            title,
            "simulated time (h since the drill's start)",
            f"water depth ({unit})",
            [Line(f"depth at node {trace['id']}", hours, values)],
            levels,
            moments,
        )
        return Figure("flood", caption, svg, data)
    return None


def other_figures(result: DemoResult) -> list[Figure]:
    """Mountain runoff and crowd counts, as recorded: the traces with their levels and marks."""
    figures = []
    for kind in ("mountain-flood", "major-event"):
        for run in _runs_of(result, kind):
            series = run.series
            traces = list(series["traces"])[:4]
            hours = _hours(series)
            offset = hours[0] if hours else 0.0
            marked = [at / 3600 for t in traces for at in (t.get("marks") or {}).values()]
            # a long record (a fortnight of counts) is shown around what happened in it
            long = bool(marked) and hours[-1] - offset > 48
            lo, hi = (min(marked) - 12, max(marked) + 12) if long else (-math.inf, math.inf)
            keep = [n for n, h in enumerate(hours) if lo <= h <= hi]
            x = [hours[n] - offset for n in keep]
            lines = [Line(f"{t['id']}", x, [t["values"][n] for n in keep]) for t in traces]
            first = traces[0]
            levels = [
                Rule(f"{name} at {first['id']}: {value:g} {series.get('unit', '')}", value, colour)
                for (name, value), colour in zip(
                    (first.get("levels") or {}).items(), ("#E69F00", "#D55E00", "#999999"), strict=False
                )
            ]
            moments = [
                Rule(f"{name} at {first['id']}", at / 3600 - offset, "#000000", "2 2")
                for name, at in (first.get("marks") or {}).items()
            ]
            unit = series.get("unit", "")
            title = f"{series.get('quantity', '')} ({series.get('source', '')}), {run.params.get('city')}"
            data = {
                "run": run.run_id,
                "unit": unit,
                "timesH": x,
                "traces": {line.label: list(line.y) for line in lines},
            }
            caption = (
                f"{kind}: {len(series['traces'])} trace(s) recorded in {_source(run, result)}"
                f"{', the first four shown' if len(series['traces']) > 4 else ''}"
                f"{'; the 24 h around the alerts shown' if len(keep) < len(hours) else ''}; "
                f"{series.get('conversion', '')}."
            )
            figures.append(
                Figure(
                    f"{kind}-{run.run_id[:8]}",
                    caption,
                    chart_svg(
                        title,
                        "simulated time (h)",
                        f"{series.get('quantity', '')} ({unit})",
                        lines,
                        levels,
                        moments,
                    ),
                    data,
                )
            )
    return figures


# --- the page ------------------------------------------------------------------------------------

_SCRIPT = """
document.querySelectorAll("table.sortable th button").forEach(function (button) {
  button.addEventListener("click", function () {
    var th = button.parentElement, table = th.closest("table"), body = table.tBodies[0];
    var column = th.cellIndex, descending = th.getAttribute("aria-sort") !== "descending";
    table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", descending ? "descending" : "ascending");
    Array.from(body.rows).sort(function (a, b) {
      var x = a.cells[column].dataset.sort, y = b.cells[column].dataset.sort;
      var order = (x === y) ? 0 : (x < y ? -1 : 1);
      return descending ? -order : order;
    }).forEach(function (row) { body.appendChild(row); });
  });
});
"""

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1180px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.9em}
th,td{border-bottom:1px solid #ddd;padding:0.3em 0.5em;text-align:left;vertical-align:top}
td{white-space:nowrap} td.wrap{white-space:normal;min-width:20em} .scroll{overflow-x:auto}
th button{font:inherit;font-weight:bold;background:none;border:none;cursor:pointer;padding:0}
th[aria-sort=descending] button::after{content:" ▼"} th[aria-sort=ascending] button::after{content:" ▲"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.swatch{display:inline-block;width:0.8em;height:0.8em;margin-right:0.3em;vertical-align:baseline}
.sev-critical{color:#b00020;font-weight:bold} .sev-warning{color:#8a5a00}
figure{margin:1em 0 2em} figcaption{font-size:0.85em;color:#555}
svg text{font-size:12px;font-family:system-ui,sans-serif}
"""


def _cell(text: object, sort: object | None = None, cls: str = "") -> str:
    key = text if sort is None else sort
    attrs = f' data-sort="{_e(key)}"' + (f' class="{cls}"' if cls else "")
    return f"<td{attrs}>{text}</td>"


def _num(value: float | None, digits: int = 0, unit: str = "") -> str:
    # numbers sort by a zero-padded key; a missing value sorts first
    key = "" if value is None else f"{value + 1e9:020.3f}"
    return _cell(_e(_fmt(value, digits, unit)), key, "num")


def _table(table_id: str, headers: Sequence[str], rows: Sequence[str], sortable: bool = False) -> str:
    if sortable:
        head = "".join(f'<th scope="col"><button type="button">{_e(h)}</button></th>' for h in headers)
    else:
        head = "".join(f'<th scope="col">{_e(h)}</th>' for h in headers)
    cls = ' class="sortable"' if sortable else ""
    return (
        f'<div class="scroll"><table id="{table_id}"{cls}><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _run_link(result: DemoResult, run_id: str | None) -> str:
    if not run_id:
        return _cell("not recorded", "")
    run = result.runs.get(run_id)
    if run is None or not result.mlflow_url:
        return _cell(_e(run_id[:8]), run_id)
    url = run_page_url(result.mlflow_url, run.experiment_id, run_id)
    return _cell(f'<a class="mlflow-run" href="{_e(url)}">{_e(run_id[:8])}</a>', run_id)


def incidents_html(result: DemoResult) -> str:
    rows = []
    for i in ordered(result.incidents):
        colour = kind_colour(i.kind)
        severity = SEVERITY_RANK.get(i.severity, 0)
        rows.append(
            f'<tr data-name="{_e(i.name)}">'
            + _cell(_e(i.city))
            + _cell(_e(i.name))
            + _cell(f'<span class="swatch" style="background:{colour}"></span>{_e(i.kind)}', i.kind)
            + _cell(_e(i.severity), severity, f"sev-{_e(i.severity)}")
            + _cell("drill" if i.drill else "live")
            + _cell(_e(i.asset))
            + _cell(
                f'<time datetime="{_e(i.detected_at)}">{_e(i.detected_at.replace("T", " "))}</time>',
                i.detected_at,
            )
            + _cell(_e(i.state))
            + _num(i.simulated_minute, 0, " min")
            + _num(i.detection_delay_min, 0, " min")
            + _num(i.lead_time_min, 0, " min")
            + _cell(_flooded(i))
            + _num(i.dispatch_s, 0, " s")
            + _num(i.response_s, 0, " s")
            + _num(i.resolution_s, 0, " s")
            + _cell("yes" if i.during_cut else "")
            + _run_link(result, i.run_id)
            + "</tr>"
        )
    return _table(
        "incidents",
        (
            "City",
            "Incident",
            "Kind",
            "Severity",
            "Mode",
            "Asset",
            "Detected (UTC)",
            "State",
            "Simulated time",
            "Detection delay",
            "Lead time",
            "Node",
            "Dispatch",
            "On site",
            "Resolved",
            "During cut",
            "MLflow run",
        ),
        rows,
        sortable=True,
    )


def runs_html(result: DemoResult) -> str:
    rows = []
    for run in sorted(
        result.runs.values(), key=lambda r: (r.params.get("city", ""), r.params.get("scenario", ""))
    ):
        p = run.params
        models = ", ".join(
            f"{k.removeprefix('model.')}: {v}" for k, v in sorted(p.items()) if k.startswith("model.")
        )
        metrics = ", ".join(f"{k} {v:g}" for k, v in sorted(run.metrics.items()))
        rows.append(
            "<tr>"
            + "".join(_cell(_e(p.get(k, ""))) for k in ("city", "scenario", "kind", "mode", "revision"))
            + _cell(_e(models or "-"), cls="wrap")
            + _cell(_e(run.status))
            + _cell(_e(metrics), cls="wrap")
            + _run_link(result, run.run_id)
            + "</tr>"
        )
    return _table(
        "runs",
        ("City", "Scenario", "Kind", "Mode", "Revision", "Models", "Status", "Metrics", "MLflow run"),
        rows,
    )


def _plain_table(table_id: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    return _table(table_id, headers, ["<tr>" + "".join(_cell(_e(c)) for c in row) + "</tr>" for row in rows])


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _json(data: Mapping[str, Any]) -> str:
    """JSON for a <script> element: a "</" inside a string cannot end the element."""
    return json.dumps(data, separators=(",", ":")).replace("</", "<\\/")


def build_page(result: DemoResult) -> str:
    """The whole report page (pure)."""
    figures = [f for f in (water_figure(result), flood_figure(result)) if f is not None] + other_figures(
        result
    )
    figure_html = "".join(
        f'<figure id="figure-{_e(f.key)}">{f.svg}<figcaption>{_e(f.caption)}</figcaption>'
        f'<script type="application/json" id="data-{_e(f.key)}">{_json(f.data)}</script></figure>'
        for f in figures
    )
    links = []
    if result.situation_map:
        links.append(f'<a id="situation-map" href="{_e(result.situation_map)}">the situation map</a>')
    if result.mlflow_url:
        links.append(f'<a id="mlflow" href="{_e(result.mlflow_url)}">MLflow</a>')
    drills = sum(1 for i in result.incidents if i.drill)
    opens = f"Open {' and '.join(links)}." if links else ""
    parts = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        "<title>CityNerve duty officer's report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>Duty officer's report</h1>",
        f"<p>{_count(len(result.incidents), 'incident')}, {drills} of them from drills (rehearsals on "
        f"simulated data), in {_count(len({i.city for i in result.incidents}), 'city', 'cities')}; "
        f"{_count(result.webhook_deliveries, 'signed alert')} delivered. Incidents are read from each city's "
        f"API server, what each workload scored from its MLflow run, city health from the hub. {opens}</p>",
        "<h2>Incidents</h2><p>Most severe first; click a column heading to sort by it.</p>",
        timeline_svg(result.incidents),
        incidents_html(result),
        "<h2>What each workload scored</h2>",
        figure_html or "<p>No scenario run was recorded in MLflow (operators without --mlflow-url).</p>",
        runs_html(result) if result.runs else "",
    ]
    if result.federation:
        parts += [
            "<h2>Federation (hub view)</h2>",
            _plain_table(
                "federation",
                ("City", "Joined", "Reachable", "Ready", "Sensors online", "Scenarios", "Open incidents"),
                [
                    (
                        c["city"],
                        c["joined"],
                        c["reachable"],
                        c["ready"],
                        c["sensors"],
                        c["scenarios"],
                        c["open"],
                    )
                    for c in result.federation
                ],
            ),
        ]
    if result.cut:
        parts.append(f'<p id="cut">{_e(cut_sentence(result.cut))}</p>')
    if result.promotions:
        parts += [
            "<h2>Model promotions</h2>",
            _plain_table(
                "promotions",
                ("Model", "Version", "Canary", "Outcome", "Cities", "Took"),
                promotion_rows(result),
            ),
        ]
    if result.clusters:
        parts += [
            "<h2>Clusters</h2>",
            _plain_table(
                "clusters",
                ("Cluster", "API", "Version", "Nodes ready"),
                [(r["name"], r["api"], r["version"], r["nodes_ready"]) for r in result.clusters],
            ),
        ]
    if result.timings:
        parts += [
            "<h2>Timings</h2>",
            _plain_table("timings", ("Step", "Took"), [(k, f"{v:.1f} s") for k, v in result.timings.items()]),
        ]
    parts.append(f"<script>{_SCRIPT}</script></body></html>\n")
    return "\n".join(parts)


def write_report(result: DemoResult, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "report.html"
    path.write_text(build_page(result))
    return path
