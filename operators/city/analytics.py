"""The scenario analytics a workload runs: the project's scenario runner, called with a sink.

``citynerve.workloads.runner.run_scenario(spec, sink)`` takes a runner spec: the scenario's
kind and mode, fleets and models carried into the evidence, detector parameters, and what to
simulate in the runner's own terms. ``runner_spec`` translates the operator's payload (the
Scenario resource with its references resolved) into it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from citynerve.models.incidents import IncidentEvent
from citynerve.models.places import city_centre

DAY_S = 24 * 3600
# `burst:<junction>` and `leak:<junction>` events: orifice areas the simulator's LeakSpec takes.
EVENT_AREAS_M2 = {"burst": 0.02, "leak": 0.003}


def _water_simulation(simulation: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"network": simulation.get("network", "Net3")}
    event = str(simulation.get("event") or "")
    kind, _, node = event.partition(":")
    if kind in EVENT_AREAS_M2 and node:
        # The event starts at 40 % of the simulated day: history before it, response after.
        out["leaks"] = [{"node": node, "area_m2": EVENT_AREAS_M2[kind], "start_s": int(DAY_S * 0.4)}]
    return out


def _crowd_simulation(simulation: Mapping[str, Any], payload: Mapping[str, Any]) -> dict[str, Any]:
    """``surge:<factor>`` adds a crowd surge of that peak factor. The drill's cameras report at the
    sampling interval of the bound crowd-camera fleet, and its detector warns at the Scenario's
    `crowdDensityPer100Sqm` levels."""
    from citynerve.workloads.sim.crowd import CROWD_SENSOR_TYPE  # noqa: PLC0415 - simulators load on first run

    out: dict[str, Any] = {}
    kind, _, factor = str(simulation.get("event") or "").partition(":")
    if kind == "surge":
        try:
            peak = float(factor or 3.0)
        except ValueError:
            peak = 3.0
        out["surge"] = {"peakFactor": peak}
    cameras = [f for f in payload.get("fleets") or [] if f.get("sensorType") == CROWD_SENSOR_TYPE]
    if cameras:
        out["samplingIntervalSeconds"] = int(cameras[0]["samplingIntervalSeconds"])
    for threshold in payload["spec"].get("thresholds") or []:
        if threshold.get("metric") == "crowdDensityPer100Sqm" and threshold.get("unitCode") == "C62":
            out["warningDensityPer100Sqm"] = threshold["warning"]
            out["alarmDensityPer100Sqm"] = threshold["alarm"]
    return out


def _mountain_levels(thresholds: list[Mapping[str, Any]]) -> dict[str, float]:
    """A `forecastDischargePercent` threshold sets each area's warn and evacuate discharge, as
    shares of its catchment's reference peak: the detector pre-warns where the Scenario says."""
    for threshold in thresholds:
        if threshold.get("metric") == "forecastDischargePercent" and threshold.get("unitCode") == "P1":
            return {"warnFactor": threshold["warning"] / 100.0, "evacuateFactor": threshold["alarm"] / 100.0}
    return {}


def drill_anchor(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Where a drill's network model is placed: its centre at the city's centre.

    A city the platform's table (``citynerve.models.places``) does not list cannot be given
    coordinates, so its drill is refused rather than placed at 0, 0.
    """
    city = str(payload.get("city") or "")
    centre = city_centre(city)
    if centre is None:
        scenario = payload.get("scenario") or {}
        raise ValueError(
            f"Scenario {scenario.get('namespace')}/{scenario.get('name')}: city {city!r} has no known "
            "centre, so its drill's network cannot be placed in it and its Incidents would have no "
            "coordinates; add the city to citynerve.models.places.CITY_CENTRES."
        )
    return {"latitude": centre[0], "longitude": centre[1], "name": f"the centre of {city.capitalize()}"}


def runner_spec(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The runner's spec for a scenario payload (pure).

    The Scenario's thresholds set the Incident severity in the operator (``incident_severity``);
    the runner's detectors keep their calibrated parameters, except a mountain-flood drill's
    warn and evacuate levels, which its `forecastDischargePercent` threshold states. Water and
    flood networks are placed at the city's centre (``drill_anchor``) so Incidents have their
    asset's coordinates.
    """
    spec = payload["spec"]
    simulation = dict(spec.get("simulation") or {})
    if spec["kind"] == "water-burst":
        sim = {**_water_simulation(simulation), "anchor": drill_anchor(payload)}
    elif spec["kind"] in ("urban-flood", "mountain-flood"):
        sim = {k: v for k, v in simulation.items() if k == "seed"}
        sim["anchor"] = drill_anchor(payload)
        if spec["kind"] == "mountain-flood":
            sim.update(_mountain_levels(list(spec.get("thresholds") or [])))
    else:
        sim = _crowd_simulation(simulation, payload)
    return {
        "kind": spec["kind"],
        "mode": spec["mode"],
        "fleets": [f["fleet"] for f in payload["fleets"]],
        "models": [
            {"name": m["name"], "role": m["role"], "modelUri": m["modelUri"]} for m in payload["models"]
        ],
        "thresholds": {},
        "simulation": sim,
    }


def run_analytics(payload: Mapping[str, Any], sink: Callable[[IncidentEvent], None]) -> dict[str, Any]:
    """Run the scenario's analytics to the end of its simulated period; incidents go to ``sink``."""
    from citynerve.workloads.runner import run_scenario  # noqa: PLC0415 - simulators load on first run

    return run_scenario(runner_spec(payload), sink)
