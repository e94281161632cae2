"""Grafana dashboards for the hub and for a city, built from the instrument names in `metrics`.

    python -m citynerve.observability.grafana          # rewrite observability/dashboards/*.json
    python -m citynerve.observability.grafana --check  # fail if the JSON files have drifted

Every query names metrics through `prometheus_name`, and a test checks each one against what
the code exports, so a renamed instrument cannot leave a dashboard silently empty.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from citynerve.observability import metrics as m

DASHBOARDS = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

P = m.prometheus_name
CITY = m.ATTR_CITY.replace(".", "_")
KIND = m.ATTR_RESOURCE_KIND.replace(".", "_")
SENSOR_TYPE = m.ATTR_SENSOR_TYPE.replace(".", "_")
REASON = m.ATTR_QUARANTINE_REASON.replace(".", "_")
INCIDENT_KIND = m.ATTR_INCIDENT_KIND.replace(".", "_")
SEVERITY = m.ATTR_SEVERITY.replace(".", "_")
STATE = m.ATTR_STATE.replace(".", "_")
OUTCOME = m.ATTR_OUTCOME.replace(".", "_")
ROUTE = m.ATTR_ROUTE.replace(".", "_")
ERROR_TYPE = m.ATTR_ERROR_TYPE.replace(".", "_")
SCENARIO_KIND = m.ATTR_SCENARIO_KIND.replace(".", "_")


def _quantile(q: float, name: str, by: str) -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({P(name)}_bucket[$__rate_interval])))"


_LEGEND = {"legend": {"displayMode": "table", "placement": "bottom"}}


def _panel(
    title: str, exprs: list[tuple[str, str]], unit: str = "short", kind: str = "timeseries",
    description: str = "",
) -> dict[str, Any]:
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": _LEGEND if kind == "timeseries" else {},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(exprs)
        ],
    }


def _layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Two panels a row, each 12 x 8 grid units."""
    for i, panel in enumerate(panels):
        panel["id"] = i + 1
        panel["gridPos"] = {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)}
    return panels


def _dashboard(uid: str, title: str, description: str, panels: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["citynerve"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [{
            "name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus",
        }]},
        "panels": _layout(panels),
    }


def hub_dashboard() -> dict[str, Any]:
    return _dashboard("citynerve-hub", "CityNerve hub", "Federation health: cities, propagation, roll-ups.", [
        _panel("Cities reachable", [(f"sum({P(m.CITY_REACHABLE)})", "reachable"),
                                    (f"count({P(m.CITY_REACHABLE)})", "members")], kind="stat"),
        _panel("Reachability by city", [(f"{P(m.CITY_REACHABLE)}", f"{{{{{CITY}}}}}"),
                                         (f"{P(m.CITY_READY)}", f"{{{{{CITY}}}}} ready")],
               description="1 while the city's agent heartbeat is fresh / the City is Ready."),
        _panel("Heartbeat age", [(f"{P(m.CITY_HEARTBEAT_AGE)}", f"{{{{{CITY}}}}}")], unit="s"),
        _panel("Sensors online", [(f"{P(m.CITY_SENSORS_ONLINE)}", f"{{{{{CITY}}}}}")]),
        _panel("Open incidents by city", [(f"{P(m.CITY_OPEN_INCIDENTS)}", f"{{{{{CITY}}}}}")]),
        _panel("Hub → city propagation latency (p99)",
               [(_quantile(0.99, m.PROPAGATION_LATENCY, CITY), f"{{{{{CITY}}}}}")], unit="s",
               description="Target: p99 ≤ 1 s on the local federation."),
        _panel("Reconcile duration (p95) by kind", [(_quantile(0.95, m.RECONCILE_DURATION, KIND),
                                                     f"{{{{{KIND}}}}}")], unit="s"),
        _panel("Reconcile errors by kind",
               [(f"sum by ({KIND}, {ERROR_TYPE}) (rate({P(m.RECONCILE_ERRORS)}[$__rate_interval]))",
                 f"{{{{{KIND}}}}} {{{{{ERROR_TYPE}}}}}")], unit="ops"),
    ])


def city_dashboard() -> dict[str, Any]:
    return _dashboard("citynerve-city", "CityNerve city", "Ingestion, detection, incidents and alerts.", [
        _panel("Readings ingested by sensor type",
               [(f"sum by ({SENSOR_TYPE}) (rate({P(m.READINGS_INGESTED)}[$__rate_interval]))",
                 f"{{{{{SENSOR_TYPE}}}}}")], unit="ops"),
        _panel("Readings quarantined by reason",
               [(f"sum by ({SENSOR_TYPE}, {REASON}) (rate({P(m.READINGS_QUARANTINED)}[$__rate_interval]))",
                 f"{{{{{SENSOR_TYPE}}}}} {{{{{REASON}}}}}"),
                (f"sum by ({SENSOR_TYPE}) (rate({P(m.READINGS_DUPLICATE)}[$__rate_interval]))",
                 f"{{{{{SENSOR_TYPE}}}}} duplicates")], unit="ops"),
        _panel("Ingestion lag (p95)",
               [(_quantile(0.95, m.INGEST_LAG, SENSOR_TYPE), f"{{{{{SENSOR_TYPE}}}}}")], unit="s"),
        _panel("Detection latency (p95) and delay from onset (p50)",
               [(_quantile(0.95, m.DETECTION_LATENCY, SCENARIO_KIND), f"latency {{{{{SCENARIO_KIND}}}}}"),
                (_quantile(0.5, m.DETECTION_DELAY, SCENARIO_KIND), f"delay {{{{{SCENARIO_KIND}}}}}")],
               unit="s"),
        _panel("Incidents created",
               [(f"sum by ({INCIDENT_KIND}, {SEVERITY}) (increase({P(m.INCIDENTS_CREATED)}[$__range]))",
                 f"{{{{{INCIDENT_KIND}}}}} {{{{{SEVERITY}}}}}")], kind="stat"),
        _panel("Incidents by state",
               [(f"sum by ({INCIDENT_KIND}, {SEVERITY}, {STATE}) ({P(m.INCIDENTS_CURRENT)})",
                 f"{{{{{INCIDENT_KIND}}}}} {{{{{SEVERITY}}}}} {{{{{STATE}}}}}")]),
        _panel("Response time from Detected (p50) per state",
               [(_quantile(0.5, m.INCIDENT_RESPONSE_TIME, STATE), f"{{{{{STATE}}}}}")], unit="s",
               description="Shanghai cut a pipe burst's response from 2-3 hours to 40 minutes."),
        _panel("Lifecycle transitions",
               [(f"sum by ({STATE}) (rate({P(m.INCIDENT_TRANSITIONS)}[$__rate_interval]))",
                 f"{{{{{STATE}}}}}")], unit="ops"),
        _panel("Alert deliveries",
               [(f"sum by ({ROUTE}, {OUTCOME}) (rate({P(m.ALERT_DELIVERIES)}[$__rate_interval]))",
                 f"{{{{{ROUTE}}}}} {{{{{OUTCOME}}}}}")], unit="ops"),
        _panel("Webhook request duration (p95)",
               [(_quantile(0.95, m.HTTP_CLIENT_DURATION, "server_address"), "{{server_address}}")], unit="s"),
        _panel("Reconcile duration (p95) by kind", [(_quantile(0.95, m.RECONCILE_DURATION, KIND),
                                                     f"{{{{{KIND}}}}}")], unit="s"),
        _panel("Reconcile errors by kind",
               [(f"sum by ({KIND}, {ERROR_TYPE}) (rate({P(m.RECONCILE_ERRORS)}[$__rate_interval]))",
                 f"{{{{{KIND}}}}} {{{{{ERROR_TYPE}}}}}")], unit="ops"),
    ])


BUILDERS = {"hub.json": hub_dashboard, "city.json": city_dashboard}


def render(dashboard: dict[str, Any]) -> str:
    return json.dumps(dashboard, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m citynerve.observability.grafana", description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the files differ from the builders")
    args = parser.parse_args(argv)
    stale = []
    for name, build in BUILDERS.items():
        path, text = DASHBOARDS / name, render(build())
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        sys.stderr.write(f"dashboards out of date: {', '.join(stale)}; "
                         "run python -m citynerve.observability.grafana\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
