"""Run a Scenario: the entry point of a KubeRay RayJob and of local Ray alike.

    python -m citynerve.workloads.runner --spec spec.json [--address auto] [--out incidents.jsonl]

A spec is the Scenario resource's spec as a plain dict:

    {"kind": "water-burst" | "urban-flood" | "mountain-flood" | "major-event",
     "mode": "live" | "drill",
     "fleets": [...], "models": [...],            # carried through to incidents' evidence
     "thresholds": {...},                          # detector parameters, by name
     "simulation": {...}}                          # what to simulate, per kind (below)

In `drill` mode everything runs on simulated data (the only source in the embedded default);
`live` mode is accepted so a Scenario can be rehearsed unchanged, and also reads simulated
feeds until a city's gateways are wired in. Incidents go to the sink: a callback when called
from Python, JSON lines on stdout (or `--out`) from the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from citynerve.models.detectors.base import SensorWindow, Window
from citynerve.models.detectors.crowd import CrowdCongestionDetector, score_drill
from citynerve.models.detectors.flood import UrbanFloodWarning
from citynerve.models.detectors.mountain import Area, MountainFloodWarning
from citynerve.models.incidents import DrillTruth, IncidentEvent, IncidentSink
from citynerve.observability.telemetry import configure_telemetry, shutdown_telemetry
from citynerve.observability.tracing import (
    detection_span,
    ingest_span,
    record_detection,
    record_ingest,
    scenario_span,
)
from citynerve.workloads.series import crowd_series, flood_series, runoff_series, water_series
from citynerve.workloads.sim.crowd import (
    CROWD_SENSOR_TYPE,
    DEFAULT_SITES,
    DEFAULT_STEP_S,
    EVENT_GATES,
    SurgeSpec,
    replay,
)
from citynerve.workloads.sim.drainage import (
    DrainageRun,
    DrainageScenarioSpec,
    StormSpec,
    critical_levels,
    drainage_placement,
    model_units,
    simulate_drainage,
)
from citynerve.workloads.sim.placement import Placement
from citynerve.workloads.sim.water import (
    LeakSpec,
    WaterScenarioSpec,
    choose_sensors,
    graph_distances,
    model_baseline,
    simulate_water,
    water_placement,
)
from citynerve.workloads.water import build_detector, window_of

KINDS = ("water-burst", "urban-flood", "mountain-flood", "major-event")
WATER_SENSOR_TYPE = "water-pressure-logger"  # the catalogue's SensorType of a drill's pressure readings


class SpecError(ValueError):
    """A scenario spec that cannot run; the message names the field."""


def run_scenario(spec: Mapping[str, Any], sink: IncidentSink) -> dict[str, Any]:
    """Run one scenario to the end of its simulated period; returns a summary."""
    kind = spec.get("kind")
    if kind not in KINDS:
        raise SpecError(f"spec.kind is {kind!r}; it must be one of {KINDS}")
    mode = spec.get("mode", "drill")
    if mode not in ("live", "drill"):
        raise SpecError(f"spec.mode is {mode!r}; it must be 'live' or 'drill'")
    sim = dict(spec.get("simulation", {}))
    thresholds = dict(spec.get("thresholds", {}))
    context = {"mode": mode, "fleets": spec.get("fleets", []), "models": spec.get("models", [])}
    emitted: list[IncidentEvent] = []

    def tagged(event: IncidentEvent) -> None:
        event = replace(event, evidence={**event.evidence, "scenario": context})
        emitted.append(event)
        record_detection(event)
        sink(event)

    runners: dict[str, Callable[[dict[str, Any], dict[str, Any], IncidentSink], dict[str, Any]]] = {
        "water-burst": _water,
        "urban-flood": _urban_flood,
        "mountain-flood": _mountain_flood,
        "major-event": _major_event,
    }
    try:
        with scenario_span(kind, mode):
            summary = runners[kind](sim, thresholds, tagged)
    except (TypeError, KeyError) as err:
        raise SpecError(f"spec.simulation or spec.thresholds for {kind}: {err}") from err
    return {"kind": kind, "mode": mode, "incidents": len(emitted), **summary}


def _water(sim: dict[str, Any], thresholds: dict[str, Any], sink: IncidentSink) -> dict[str, Any]:
    network = sim.get("network", "Net3")
    leaks = tuple(LeakSpec(**leak) for leak in sim.get("leaks", []))
    base = WaterScenarioSpec(
        network=network,
        duration_s=int(sim.get("durationSeconds", 24 * 3600)),
        hydraulic_step_s=int(sim.get("hydraulicStepSeconds", 900)),
        sensors=choose_sensors(network, int(sim.get("pressureSensors", 10))),
        seed=int(sim.get("seed", 0)),
    )
    detector = build_detector(base, **thresholds)
    # the drill's field readings: one batch from the simulated pressure loggers
    with ingest_span(WATER_SENSOR_TYPE) as span:
        run = simulate_water(replace(base, leaks=leaks))
        window = window_of(run, model_baseline(base))
        readings = int(run.pressure.size)
        span.set_attribute("citynerve.ingest.batch_size", readings)
        record_ingest(WATER_SENSOR_TYPE, readings)
    placement = _placement(sim, lambda anchor, name: water_placement(network, anchor, name))
    with detection_span("water-burst", type(detector).__name__):
        events = [
            _placed(replace(event, truth=_burst_truth(network, leaks, event)), placement,
                    label=f"junction {event.location.asset_id}")
            for event in detector.predict(window)
        ]
        for event in events:
            sink(event)
    return {"network": network, "leaks": len(leaks), "detections": len(events),
            "series": water_series(window, leaks, events, network)}


def _drainage_window(run: DrainageRun) -> Window:
    return {
        "currentLevel": SensorWindow(run.times_s, run.nodes, run.level),
        "precipitation": SensorWindow(run.times_s, run.gauges, run.rainfall),
        "flow": SensorWindow(run.times_s, run.catchments, run.runoff),
    }


def _storm(sim: dict[str, Any], peak: float | None = None) -> StormSpec:
    return StormSpec(
        peak_intensity=float(peak if peak is not None else sim.get("peakIntensity", 2.0)),
        start_s=int(sim.get("stormStartSeconds", 2 * 3600)),
        duration_s=int(sim.get("stormDurationSeconds", 3 * 3600)),
    )


def _urban_flood(sim: dict[str, Any], thresholds: dict[str, Any], sink: IncidentSink) -> dict[str, Any]:
    model = sim.get("model", "model_lids")
    watched = tuple(sim.get("watchedNodes", ()))
    spec = DrainageScenarioSpec(
        model=model, storm=_storm(sim), watched_nodes=watched, seed=int(sim.get("seed", 0))
    )
    dry = simulate_drainage(replace(spec, storm=_storm(sim, 0.0)))
    run = simulate_drainage(spec)
    units = model_units(model)
    detector = UrbanFloodWarning(
        critical_levels(model, run.nodes), step_s=spec.report_step_s,
        **{"mm_per_unit": 1000.0 * units.metres_per_length,
           "rain_mm_per_hour_per_unit": units.mm_per_hour_per_rain, **thresholds},
    )
    detector.fit(_drainage_window(dry))
    placement = _placement(sim, lambda anchor, name: drainage_placement(model, anchor, name))
    with detection_span("urban-flood", type(detector).__name__):
        events = [
            _placed(replace(event, truth=_flood_truth(run.flood_onset_s(event.location.asset_id), event)),
                    placement, label=f"node {event.location.asset_id}")
            for event in detector.predict(_drainage_window(run))
        ]
        for event in events:
            sink(event)
    lead = {}
    for event in events:
        onset = run.flood_onset_s(event.location.asset_id)
        if onset is not None:
            lead[event.location.asset_id] = onset - event.detected_at_s
    return {"model": model, "warnings": len(events), "lead_time_s": lead,
            "series": flood_series(run, detector.critical_level, events, model)}


def _mountain_flood(sim: dict[str, Any], thresholds: dict[str, Any], sink: IncidentSink) -> dict[str, Any]:
    model = sim.get("model", "model_lids")
    calibration = simulate_drainage(
        DrainageScenarioSpec(model=model, storm=_storm(sim, sim.get("calibrationPeak", 1.0)))
    )
    warn_factor = float(sim.get("warnFactor", 1.2))
    evacuate_factor = float(sim.get("evacuateFactor", 1.8))
    # each area's levels are set against its catchment's peak in the calibration storm
    areas = [
        Area(c, f"area-{c}", warn_factor * q, evacuate_factor * q, reference_discharge=q)
        for c, q in zip(calibration.catchments, calibration.runoff.max(axis=0), strict=True)
    ]
    units = model_units(model)
    detector = MountainFloodWarning(
        areas, step_s=300,
        **{"flow_m3s_per_unit": units.cubic_metres_per_second_per_flow,
           "rain_mm_per_hour_per_unit": units.mm_per_hour_per_rain, **thresholds},
    )
    detector.fit(
        _drainage_window(calibration),
        dict(zip(calibration.catchments, calibration.catchment_area, strict=True)),
    )
    storm = simulate_drainage(
        DrainageScenarioSpec(model=model, storm=_storm(sim), seed=int(sim.get("seed", 0)))
    )
    window = _drainage_window(storm)
    drills = detector.rehearse({"scenario-storm": window})
    passed = {d.catchment: d.exceeded_at_s for d in drills}
    catchment_of = {a.name: a.catchment for a in areas}
    placement = _placement(sim, lambda anchor, name: drainage_placement(model, anchor, name))
    with detection_span("mountain-flood", type(detector).__name__):
        events = [
            _placed(
                replace(event, truth=_flood_truth(passed.get(catchment_of[event.location.asset_id]), event)),
                placement,
                f"subcatchment:{catchment_of[event.location.asset_id]}",
                f"{event.location.asset_id} (subcatchment {catchment_of[event.location.asset_id]})",
            )
            for event in detector.predict(window)
        ]
        for event in events:
            sink(event)
    return {
        "model": model,
        "prewarnings": len(events),
        "rehearsal": [{"catchment": d.catchment, "lead_time_s": d.lead_time_s} for d in drills],
        "evacuation_plan": detector.preplan(window),
        "series": runoff_series(
            storm, {a.catchment: (a.warn_discharge, a.evacuate_discharge) for a in areas}, events, model
        ),
    }


def _placement(
    sim: dict[str, Any], place: Callable[[tuple[float, float], str], Placement]
) -> Placement | None:
    """The drill's network placed at `simulation.anchor` ({latitude, longitude, name}), if one is given."""
    anchor = sim.get("anchor")
    if not anchor:
        return None
    point = (float(anchor["latitude"]), float(anchor["longitude"]))
    return place(point, str(anchor.get("name") or "the anchor"))


def _placed(
    event: IncidentEvent, placement: Placement | None, point: str | None = None, label: str | None = None
) -> IncidentEvent:
    """`event` with its asset's coordinates in the city (`point` names the asset on the model's
    plane, `label` as a person reads it; both default to the asset id)."""
    if placement is None:
        return event
    where = placement.locate(point or event.location.asset_id)
    if where is None:
        return event
    location = replace(event.location, lat=where[0], lon=where[1],
                       placement=placement.describe(label or event.location.asset_id))
    return replace(event, location=location)


def _burst_truth(network: str, leaks: tuple[LeakSpec, ...], event: IncidentEvent) -> DrillTruth:
    """The injected burst nearest (along pipes) to the reported junction, of those started by then."""
    started = [leak for leak in leaks if leak.start_s <= event.detected_at_s]
    if not started:
        return DrillTruth()  # no burst had started: a false alarm
    measured = []
    for leak in started:
        hops, metres = graph_distances(network, leak.node, [event.location.asset_id])
        measured.append((float(metres[0]), float(hops[0]), leak.node))
    metres_m, hops_n, node = min(measured)
    if not np.isfinite(metres_m):
        return DrillTruth(true_asset=node)
    return DrillTruth(true_asset=node, distance_m=metres_m, hops=int(hops_n))


def _flood_truth(onset_s: float | None, event: IncidentEvent) -> DrillTruth:
    """Whether the warned asset flooded in the run, and the warning's lead time where it did."""
    if onset_s is None:
        return DrillTruth(true_asset=event.location.asset_id, flooded=False)
    return DrillTruth(true_asset=event.location.asset_id, flooded=True, flood_onset_s=onset_s,
                      lead_time_s=onset_s - event.detected_at_s)


def _major_event(sim: dict[str, Any], thresholds: dict[str, Any], sink: IncidentSink) -> dict[str, Any]:
    """Gate cameras at the circuit every `samplingIntervalSeconds` (the crowd fleet's interval),
    arrivals shaped by Auckland's published counts; alerts are scored against the measured breach."""
    sites = tuple(sim.get("sites", DEFAULT_SITES))
    step_s = float(sim.get("samplingIntervalSeconds", DEFAULT_STEP_S))
    seed = int(sim.get("seed", 0))
    history_start, history_days = sim.get("historyStart", "2024-06-03"), int(sim.get("historyDays", 56))
    history = replay(history_start, history_days, sites, seed=seed + 1, step_s=step_s)
    start = sim.get("eventStart", "2024-08-05")
    surge_cfg = sim.get("surge")
    surge = (
        SurgeSpec(
            sites=tuple(surge_cfg.get("sites", [s for s in EVENT_GATES if s in sites] or sites[:4])),
            start_h=float(surge_cfg.get("startHour", 5 * 24 + 15)),
            peak_factor=float(surge_cfg.get("peakFactor", 3.0)),
        )
        if surge_cfg
        else None
    )
    with ingest_span(CROWD_SENSOR_TYPE) as span:
        run = replay(start, int(sim.get("days", 14)), sites, surge=surge, seed=seed, step_s=step_s)
        window = run.window(origin=history.start)
        readings = int(np.isfinite(run.people).sum() + np.isfinite(run.density).sum())
        span.set_attribute("citynerve.ingest.batch_size", readings)
        record_ingest(CROWD_SENSOR_TYPE, readings)
    scenario_levels = {"warning_density": "warningDensityPer100Sqm", "alarm_density": "alarmDensityPer100Sqm"}
    levels = {name: float(sim[key]) for name, key in scenario_levels.items() if key in sim}
    detector = CrowdCongestionDetector(locations=history.locations, **{**levels, **thresholds})
    detector.fit(history.window())
    breaches = run.breaches(detector.warning_density, detector.rearm_s, origin=history.start)
    with detection_span("major-event", type(detector).__name__):
        scored = detector.predict(window)
    score = score_drill(scored, breaches, detector.horizon_s + detector.rearm_s)
    leads = {(m.site, m.detected_at_s): m.lead_time_s for m in score.matched}
    events = [
        replace(
            event,
            location=replace(event.location, placement=run.placement(event.location.asset_id)),
            truth=DrillTruth(
                true_asset=event.location.asset_id,
                lead_time_s=leads.get((event.location.asset_id, event.detected_at_s)),
            ),
        )
        for event in scored
    ]
    for event in events:
        sink(event)
    return {
        "sites": len(sites),
        "samplingIntervalSeconds": step_s,
        "alerts": len(events),
        "surge": surge is not None,
        "breaches": sum(len(times) for times in breaches.values()),
        "breach_at_s": {site: times for site, times in breaches.items() if times},
        "lead_time_s": {m.site: m.lead_time_s for m in score.matched},
        "alerts_without_breach": score.alerts_without_breach,
        "missed_breaches": score.missed_breaches,
        "series": crowd_series(
            window["crowdDensity"], events,
            "gate cameras at the circuit; arrivals shaped by Auckland's published pedestrian counts",
            unit="people per 100 m²", quantity="crowd density seen by the gate camera",
            conversion="people queued in the camera's 100 m² zone, as the drill's point queue computes them",
        ),
    }


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m citynerve.workloads.runner", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--spec", required=True, type=Path, help="scenario spec as JSON")
    parser.add_argument(
        "--address", default=None, help="Ray address (a RayJob sets RAY_ADDRESS; default: local)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="write incidents as JSON lines here (default stdout)"
    )
    args = parser.parse_args(argv)
    try:
        spec = orjson.loads(args.spec.read_bytes())
    except (OSError, orjson.JSONDecodeError) as err:
        parser.error(f"--spec {args.spec}: {err}")
    import ray  # noqa: PLC0415 - only the command line starts or joins Ray

    # the OTEL_* variables of the RayJob's environment decide what is exported (or turn it off)
    configure_telemetry("citynerve-workload", city=os.environ.get("CITYNERVE_CITY"))
    started = not ray.is_initialized()
    if started:
        ray.init(address=args.address, include_dashboard=False)
    out = args.out.open("wb") if args.out else sys.stdout.buffer
    try:

        def sink(event: IncidentEvent) -> None:
            out.write(
                orjson.dumps(event.to_dict(), default=_json_default, option=orjson.OPT_SERIALIZE_NUMPY)
                + b"\n"
            )
            out.flush()

        try:
            summary = run_scenario(spec, sink)
        except SpecError as err:
            print(f"error: {err}", file=sys.stderr)  # noqa: T201 - the command line's own message
            return 2
        summary.pop("series", None)  # what was scored is recorded by the workload, not printed
        sys.stderr.write(orjson.dumps({"summary": summary}, default=_json_default).decode() + "\n")
    finally:
        if args.out:
            out.close()
        if started:
            ray.shutdown()
        shutdown_telemetry()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
