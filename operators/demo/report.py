"""The demo's summary table and HTML report, from what happened in the run (pure functions)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from citynerve.operators.cli import format_table


@dataclass
class IncidentRecord:
    """One incident as the demo saw it, with its lifecycle from the Incident's own timestamps."""

    city: str
    name: str
    kind: str
    severity: str
    asset: str
    detected_at: str
    state: str
    simulated_minute: float | None = None
    detection_delay_min: float | None = None
    lead_time_min: float | None = None
    dispatch_s: int | None = None
    response_s: int | None = None
    resolution_s: int | None = None
    during_cut: bool = False


@dataclass
class DemoResult:
    """Everything the summary and the report show; every figure measured in this run."""

    clusters: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    incidents: list[IncidentRecord] = field(default_factory=list)
    promotions: list[dict[str, Any]] = field(default_factory=list)
    federation: list[dict[str, Any]] = field(default_factory=list)
    cut: dict[str, Any] = field(default_factory=dict)
    series: dict[str, Any] = field(default_factory=dict)
    webhook_deliveries: int = 0
    situation_map: str | None = None


def _fmt(value: float | None, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}{unit}"


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
            _fmt(i.dispatch_s, 0, " s"),
            _fmt(i.response_s, 0, " s"),
            _fmt(i.resolution_s, 0, " s"),
            "yes" if i.during_cut else "",
        )
        for i in incidents
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
            "DISPATCH",
            "ON SITE",
            "RESOLVED",
            "DURING CUT",
        ),
        rows,
    )


def summary_text(result: DemoResult) -> str:
    parts = ["INCIDENTS", incident_table(result.incidents), ""]
    if result.promotions:
        rows: list[tuple[Any, ...]] = [
            (
                p["model"],
                p["version"],
                p["canary"],
                p["outcome"],
                ", ".join(p["cities"]),
                _fmt(p.get("seconds"), 1, " s"),
            )
            for p in result.promotions
        ]
        parts += [
            "PROMOTIONS",
            format_table(("MODEL", "VERSION", "CANARY", "OUTCOME", "CITIES", "TOOK"), rows),
            "",
        ]
    if result.federation:
        fed_rows: list[tuple[Any, ...]] = [
            (c["city"], c["joined"], c["reachable"], c["ready"], c["sensors"], c["scenarios"], c["open"])
            for c in result.federation
        ]
        rows = fed_rows
        parts += [
            "FEDERATION (hub view)",
            format_table(
                ("CITY", "JOINED", "REACHABLE", "READY", "SENSORS ONLINE", "SCENARIOS", "OPEN INCIDENTS"),
                rows,
            ),
            "",
        ]
    if result.cut:
        cut = result.cut
        parts += [
            f"Chengdu cut off for {cut['seconds']:.0f} s: marked unreachable after "
            f"{cut['marked_unreachable_s']:.1f} s (heartbeat timeout {cut['timeout_s']} s); "
            f"{cut['incidents_during']} incident(s) detected in Chengdu meanwhile; hub roll-up caught up "
            f"{cut['caught_up_s']:.1f} s after the link returned; nothing deleted "
            f"({cut['objects_before']} → {cut['objects_after']} propagated objects).",
            "",
        ]
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items())
    parts.append(f"Timings: {timings}")
    return "\n".join(parts)


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def plots(result: DemoResult) -> dict[str, str]:
    """Base64 PNGs: detection timeline, pressure at the burst, flood level against the warning."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # noqa: PLC0415

    images: dict[str, str] = {}
    if result.incidents:
        fig, ax = plt.subplots(figsize=(8, 2.6))
        cities = sorted({i.city for i in result.incidents})
        for incident in result.incidents:
            y = cities.index(incident.city)
            x = incident.detected_at[11:19]
            ax.scatter([x], [y], s=60, label=incident.kind)
        ax.set_yticks(range(len(cities)), cities)
        ax.set_title("Incidents detected (wall clock, UTC)")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=False))
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left")
        images["timeline"] = _png(fig)
        plt.close(fig)
    water = result.series.get("water")
    if water:
        fig, ax = plt.subplots(figsize=(8, 3))
        for sensor, values in water["pressure"].items():
            ax.plot(water["hours"], values, linewidth=1, label=f"logger {sensor}")
        ax.axvline(water["onset_h"], color="red", linestyle="--", label="burst onset")
        if water.get("detected_h") is not None:
            ax.axvline(water["detected_h"], color="black", linestyle=":", label="detected")
        ax.set_xlabel("simulated hour")
        ax.set_ylabel("pressure residual (m)")
        ax.set_title(f"Pressure at the loggers nearest the burst ({water['network']}, node {water['node']})")
        ax.legend(fontsize=7)
        images["pressure"] = _png(fig)
        plt.close(fig)
    flood = result.series.get("flood")
    if flood:
        fig, ax = plt.subplots(figsize=(8, 3))
        ax.plot(flood["hours"], flood["level"], label=f"water level at {flood['node']}")
        ax.axhline(flood["critical"], color="orange", linestyle="--", label="critical level")
        if flood.get("warned_h") is not None:
            ax.axvline(flood["warned_h"], color="black", linestyle=":", label="warning")
        if flood.get("flooded_h") is not None:
            ax.axvline(flood["flooded_h"], color="red", linestyle="--", label="flooding")
        ax.set_xlabel("simulated hour")
        ax.set_ylabel("depth (ft)")
        ax.set_title("Underpass water level against the warning (SWMM)")
        ax.legend(fontsize=7)
        images["flood"] = _png(fig)
        plt.close(fig)
    return images


def write_report(result: DemoResult, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    images = plots(result)
    figures = "".join(
        f'<figure><img alt="{html.escape(k)}" src="data:image/png;base64,{v}"></figure>'
        for k, v in images.items()
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>CityNerve demo report</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}
pre{{background:#f4f4f4;padding:1em;overflow-x:auto}}img{{max-width:100%}}</style></head>
<body><h1>CityNerve: the federation story</h1>
<p>Every figure below was measured in this run of <code>make demo</code>.</p>
<pre>{html.escape(summary_text(result))}</pre>
{figures}
<h2>Clusters</h2><pre>{html.escape(_clusters(result.clusters))}</pre>
</body></html>
"""
    path = folder / "report.html"
    path.write_text(page)
    return path


def _clusters(rows: Sequence[Mapping[str, Any]]) -> str:
    return format_table(
        ("CLUSTER", "API", "VERSION", "NODES READY"),
        [(r["name"], r["api"], r["version"], r["nodes_ready"]) for r in rows],
    )
