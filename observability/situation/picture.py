"""The situation picture: what the hub knows of every city and its incidents, as one JSON document.

`situation_picture` is pure (City objects and agent reports in, a document out); `HubReader`
reads those from the hub with the Kubernetes client: the City objects, and in each city's
namespace ``city-<name>`` the ConfigMap ``agent-report`` its agent writes (key ``report.json``:
``{"objects": {...}, "incidents": [...]}``).

The incident list is in the order a duty officer works it (`incident_order`): open incidents
first, most severe first (critical, alarm, warning, as the Incident CRD's ``spec.severity``), and
within a severity the oldest first; resolved ones after them, most recently resolved first. The
page hides resolved ones unless asked (`visible_incidents`), and draws on the map only those with
coordinates (`on_map`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from citynerve.observability.situation.geo import CITY_COORDINATES
from kubernetes import client

GROUP, VERSION = "citynerve.io", "v1alpha1"
REPORT_CONFIGMAP, REPORT_KEY = "agent-report", "report.json"
LATITUDE_ANNOTATION = "citynerve.io/latitude"
LONGITUDE_ANNOTATION = "citynerve.io/longitude"
LIFECYCLE = ("Detected", "Dispatched", "OnSite", "Resolved")
#: The Incident CRD's severities, most severe first; the page's legend and colours follow it.
SEVERITIES = ("critical", "alarm", "warning")

log = logging.getLogger(__name__)


def city_namespace(city: str) -> str:
    return f"city-{city}"


def _condition(city: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for cond in (city.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return None


def city_health(city: Mapping[str, Any]) -> tuple[str, str]:
    """(health, a sentence): Ready, Degraded, Unreachable or Pending, from the City's conditions."""
    joined, reachable, ready = (_condition(city, k) for k in ("Joined", "Reachable", "Ready"))
    if not joined or joined.get("status") != "True":
        return "Pending", str((joined or {}).get("message") or "has not joined the federation yet")
    if reachable is not None and reachable.get("status") != "True":
        return "Unreachable", str(reachable.get("message") or "its agent's heartbeat is late")
    if ready is not None and ready.get("status") == "True":
        return "Ready", str(ready.get("message") or "ready")
    return "Degraded", str((ready or {}).get("message") or "not ready")


def city_position(city: Mapping[str, Any]) -> tuple[float, float] | None:
    annotations = (city.get("metadata") or {}).get("annotations") or {}
    try:
        return float(annotations[LATITUDE_ANNOTATION]), float(annotations[LONGITUDE_ANNOTATION])
    except (KeyError, ValueError):
        name = str((city.get("metadata") or {}).get("name", ""))
        return CITY_COORDINATES.get(name)


def sensors_by_type(reported: Any) -> list[dict[str, Any]]:
    """The agent's ``status.sensorsOnline`` (a list of ``{sensorType, count}``), cleaned."""
    if not isinstance(reported, list):
        return []
    return [{"sensorType": str(e.get("sensorType")), "count": int(e.get("count") or 0)}
            for e in reported if isinstance(e, Mapping)]


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def coordinates(location: Mapping[str, Any]) -> tuple[float, float] | None:
    """(latitude, longitude) of an incident's ``location``, or None when it has none (or nonsense)."""
    lat, lon = _number(location.get("latitude")), _number(location.get("longitude"))
    if lat is None or lon is None or not (-90 <= lat <= 90 and -180 <= lon <= 180):
        return None
    return lat, lon


def severity_rank(severity: Any) -> int:
    """0 for the most severe (critical), then alarm, warning; an unknown severity sorts last."""
    return SEVERITIES.index(severity) if severity in SEVERITIES else len(SEVERITIES)


def _resolved_at(incident: Mapping[str, Any]) -> str:
    for step in incident.get("timeline") or []:
        if step.get("state") == "Resolved" and step.get("time"):
            return str(step["time"])
    return str(incident.get("detectedAt") or "")


def incident_order(incidents: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Incident views in the order a duty officer works them.

    Open ones first: by severity (critical, alarm, warning, then any other), then by age, the
    oldest (earliest ``detectedAt``) first, then by id so that the order is stable. Resolved ones
    after all open ones, the most recently resolved first.
    """
    far_future = datetime.max.replace(tzinfo=UTC)

    def open_key(inc: Mapping[str, Any]) -> tuple[int, datetime, str]:
        return severity_rank(inc.get("severity")), _parse(inc.get("detectedAt")) or far_future, str(inc["id"])

    open_ = sorted((i for i in incidents if i.get("state") != "Resolved"), key=open_key)
    long_ago = datetime.min.replace(tzinfo=UTC)
    resolved = sorted((i for i in incidents if i.get("state") == "Resolved"),
                      key=lambda i: (_parse(_resolved_at(i)) or long_ago, str(i["id"])), reverse=True)
    return [dict(i) for i in (*open_, *resolved)]


def visible_incidents(incidents: Sequence[Mapping[str, Any]], show_resolved: bool = False,
                      ) -> list[Mapping[str, Any]]:
    """The incidents the list shows: all of them, or (the default) all but the resolved ones."""
    return [i for i in incidents if show_resolved or i.get("state") != "Resolved"]


def on_map(incidents: Sequence[Mapping[str, Any]], show_resolved: bool = False) -> list[Mapping[str, Any]]:
    """The incidents the map draws: the visible ones that have coordinates."""
    return [i for i in visible_incidents(incidents, show_resolved)
            if i.get("latitude") is not None and i.get("longitude") is not None]


def incident_view(city: str, incident: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """One incident of an agent's digest, with its coordinates (if any) and timeline."""
    location = dict(incident.get("location") or {})
    position = coordinates(location)
    transitions = [dict(t) for t in incident.get("transitions") or []]
    detected = _parse(incident.get("detectedAt"))
    reached = {str(t.get("state")): t for t in transitions}
    timeline = []
    for state in LIFECYCLE:
        step = reached.get(state)
        at = _parse(step.get("time")) if step else None
        timeline.append({
            "state": state,
            "reached": step is not None,
            "time": step.get("time") if step else None,
            "actor": step.get("actor") if step else None,
            "afterSeconds": (at - detected).total_seconds() if at and detected else None,
        })
    state = str(incident.get("state") or "Detected")
    open_for = (now - detected).total_seconds() if detected and state != "Resolved" else None
    view: dict[str, Any] = {
        "id": f"{city}/{incident.get('namespace', '')}/{incident.get('name', '')}",
        "city": city,
        "name": incident.get("name"),
        "namespace": incident.get("namespace"),
        "kind": incident.get("kind"),
        "severity": incident.get("severity"),
        "state": state,
        "drill": bool(incident.get("drill", False)),
        "detectedAt": incident.get("detectedAt"),
        "location": location,
        "timeline": timeline,
        "responseSeconds": incident.get("responseSeconds"),
        "openSeconds": open_for,
        "latitude": position[0] if position else None,
        "longitude": position[1] if position else None,
    }
    return view


def _parse(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def situation_picture(
    cities: Sequence[Mapping[str, Any]],
    reports: Mapping[str, Mapping[str, Any] | None],
    now: datetime | None = None,
) -> dict[str, Any]:
    """The document the page draws: cities (health, sensors, incidents, position) and incidents."""
    now = now or datetime.now(UTC)
    city_views: list[dict[str, Any]] = []
    incidents: list[dict[str, Any]] = []
    for city in sorted(cities, key=lambda c: str(c["metadata"]["name"])):
        name = str(city["metadata"]["name"])
        spec, status = city.get("spec") or {}, city.get("status") or {}
        health, message = city_health(city)
        report = reports.get(name) or {}
        objects = report.get("objects") or {}
        view: dict[str, Any] = {
            "name": name,
            "displayName": spec.get("displayName") or name.title(),
            "region": spec.get("region"),
            "health": health,
            "message": message,
            "sensorsOnline": int(status.get("sensorsOnlineTotal") or 0),
            "sensorsByType": sensors_by_type(status.get("sensorsOnline")),
            "activeScenarios": status.get("activeScenarios", 0),
            "openIncidents": status.get("openIncidents", 0),
            "lastHeartbeat": status.get("lastHeartbeat"),
            "lastIncident": status.get("lastIncident"),
            "objects": len(objects),
            "objectsReady": sum(1 for o in objects.values() if o.get("ready") == "True"),
            "reported": name in reports and reports[name] is not None,
        }
        position = city_position(city)
        if position is not None:
            view["latitude"], view["longitude"] = position
        city_views.append(view)
        incidents.extend(incident_view(name, inc, now) for inc in report.get("incidents") or [])
    ordered = incident_order(incidents)
    return {
        "generatedAt": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "severities": list(SEVERITIES),
        "cities": city_views,
        "incidents": ordered,
        "openIncidents": len(visible_incidents(ordered)),
        "openIncidentsOnMap": len(on_map(ordered)),
    }


@dataclass
class HubReader:
    """Reads Cities and agent reports from the hub (needs list/get on cities and get on the
    ``agent-report`` ConfigMaps in ``city-*``)."""

    api: client.ApiClient

    def cities(self) -> list[dict[str, Any]]:
        listed = client.CustomObjectsApi(self.api).list_cluster_custom_object(
            GROUP, VERSION, "cities", _request_timeout=10)
        return list(listed.get("items", []))

    def report(self, city: str) -> dict[str, Any] | None:
        try:
            cm = client.CoreV1Api(self.api).read_namespaced_config_map(
                REPORT_CONFIGMAP, city_namespace(city), _request_timeout=10)
        except client.ApiException as exc:
            if exc.status in (403, 404):
                return None
            raise
        text = (cm.data or {}).get(REPORT_KEY)
        if not text:
            return None
        try:
            report = json.loads(text)
        except json.JSONDecodeError:
            log.warning("agent-report of city %s is not JSON; ignored", city)
            return None
        return report if isinstance(report, dict) else None

    def picture(self) -> dict[str, Any]:
        cities = self.cities()
        reports = {str(c["metadata"]["name"]): self.report(str(c["metadata"]["name"])) for c in cities}
        return situation_picture(cities, reports)
