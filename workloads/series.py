"""The series a scenario's detector scored, as the runner returns them in its summary (``series``).

The workload records them with its run (``series.json``, see ``citynerve.models.scenario_runs``)
and the duty officer's report draws them from there. One shape for every kind:

    {"quantity": "water depth", "unit": "m", "conversion": "SWMM lengths in ft x 0.3048 m/ft",
     "source": "SWMM model_lids", "timesS": [...],                # simulated seconds, the incidents' clock
     "marks": {"burstOnset@123": 34560.0},                       # ground truth of the drill
     "traces": [{"id": "10", "values": [...],                     # null where there was no reading
                 "marks": {"floodOnset": 9000.0, "warned": 8700.0},
                 "levels": {"drainsFull": 0.3048}}]}

Values are in SI units (kPa, m, m³/s, people per hour); the conversion from the engine's own
units is stated with its factor.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from citynerve.models.detectors.base import SensorWindow, Window
from citynerve.models.incidents import IncidentEvent
from citynerve.workloads.sim.drainage import DrainageRun, model_path

KPA_PER_METRE_OF_WATER = 9.80665  # rho g / 1000 with rho = 1000 kg/m³ and g = 9.80665 m/s²
METRES_PER_FOOT = 0.3048
CUBIC_METRES_PER_CUBIC_FOOT = 0.028316846592
_US_FLOW_UNITS = ("CFS", "GPM", "MGD")  # SWMM: these flow units mean lengths in feet


def _values(column: npt.ArrayLike, factor: float = 1.0) -> list[float | None]:
    return [None if not math.isfinite(v) else round(v * factor, 6) for v in np.asarray(column, dtype=float)]


def swmm_length_factor(model: str) -> tuple[float, str]:
    """Metres per length unit of a bundled SWMM model, and the conversion in words (from FLOW_UNITS)."""
    found = re.search(r"^FLOW_UNITS\s+(\S+)", model_path(model).read_text(), flags=re.MULTILINE)
    units = found.group(1).upper() if found else "CMS"
    if units in _US_FLOW_UNITS:
        return METRES_PER_FOOT, f"SWMM {model} is in US units ({units}): ft x {METRES_PER_FOOT} m/ft"
    return 1.0, f"SWMM {model} is in SI units ({units}): lengths in m"


def water_series(
    window: Window, leaks: Iterable[Any], events: Sequence[IncidentEvent], network: str
) -> dict[str, Any]:
    """Pressure residual (field - hydraulic model) at the loggers the detections named as evidence
    (the three that dropped most when none did), in kPa."""
    field, model = window["pressure"], window["pressure_model"]
    sensors = list(field.sensors)
    residual = np.nan_to_num(field.values - model.values)
    named = [s for e in events for s in (e.evidence.get("pressure_drop_m") or {}) if s in sensors]
    chosen = list(dict.fromkeys(named))
    if not chosen:
        chosen = [sensors[i] for i in np.argsort(residual.min(axis=0))[:3]]
    return {
        "quantity": "pressure residual (field - hydraulic model)",
        "unit": "kPa",
        "conversion": f"WNTR pressure head in m x {KPA_PER_METRE_OF_WATER} kPa/m",
        "source": f"WNTR {network}",
        "timesS": _values(field.times_s),
        "marks": {f"burstOnset@{leak.node}": float(leak.start_s) for leak in leaks},
        "traces": [
            {
                "id": s,
                "values": _values(residual[:, sensors.index(s)], KPA_PER_METRE_OF_WATER),
                "marks": {},
                "levels": {},
            }
            for s in chosen
        ],
    }


def flood_series(
    run: DrainageRun, critical: Mapping[str, float], events: Sequence[IncidentEvent], model: str
) -> dict[str, Any]:
    """Water depth at every node that was warned or flooded, with its flood onset (the drill's
    truth), when it was warned, and the depth at which its drains run full, in m."""
    factor, conversion = swmm_length_factor(model)
    warned = {e.location.asset_id: e.detected_at_s for e in events}
    traces = []
    for j, node in enumerate(run.nodes):
        onset = run.flood_onset_s(node)
        if onset is None and node not in warned:
            continue
        traces.append(
            {
                "id": node,
                "values": _values(run.level[:, j], factor),
                "marks": {
                    k: float(v)
                    for k, v in (("floodOnset", onset), ("warned", warned.get(node)))
                    if v is not None
                },
                "levels": {"drainsFull": round(critical[node] * factor, 6)} if node in critical else {},
            }
        )
    return {
        "quantity": "water depth",
        "unit": "m",
        "conversion": conversion,
        "source": f"SWMM {model}",
        "timesS": _values(run.times_s),
        "marks": {},
        "traces": traces,
    }


def runoff_series(
    run: DrainageRun,
    thresholds: Mapping[str, tuple[float, float]],
    events: Sequence[IncidentEvent],
    model: str,
) -> dict[str, Any]:
    """Runoff of every catchment that was pre-warned, with its warn and evacuate discharges, in m³/s."""
    feet, _ = swmm_length_factor(model)
    factor = CUBIC_METRES_PER_CUBIC_FOOT if feet != 1.0 else 1.0
    warned = {str(e.evidence.get("catchment")): e.detected_at_s for e in events}
    traces = []
    for j, catchment in enumerate(run.catchments):
        if catchment not in warned:
            continue
        warn, evacuate = thresholds.get(catchment, (math.nan, math.nan))
        traces.append(
            {
                "id": catchment,
                "values": _values(run.runoff[:, j], factor),
                "marks": {"warned": float(warned[catchment])},
                "levels": {
                    k: round(v * factor, 6)
                    for k, v in (("warn", warn), ("evacuate", evacuate))
                    if math.isfinite(v)
                },
            }
        )
    return {
        "quantity": "catchment runoff",
        "unit": "m3/s",
        "conversion": f"SWMM {model} flows in " + (f"ft³/s x {factor} m³/ft³" if factor != 1.0 else "m³/s"),
        "source": f"SWMM {model}",
        "timesS": _values(run.times_s),
        "marks": {},
        "traces": traces,
    }


def crowd_series(
    counts: SensorWindow, events: Sequence[IncidentEvent], source: str, unit: str = "people/h",
    quantity: str = "people counted", conversion: str = "counts as replayed",
) -> dict[str, Any]:
    """``quantity`` at every site that raised an alert, with the capacity it was judged against."""
    sites = list(counts.sensors)
    alerted: dict[str, IncidentEvent] = {}
    for event in events:
        alerted.setdefault(event.location.asset_id, event)
    traces = []
    for site, event in alerted.items():
        if site not in sites:
            continue
        capacity = event.evidence.get("capacity")
        traces.append(
            {
                "id": site,
                "values": _values(counts.values[:, sites.index(site)]),
                "marks": {"alerted": float(event.detected_at_s)},
                "levels": {"capacity": round(float(capacity), 6)}
                if isinstance(capacity, int | float)
                else {},
            }
        )
    return {
        "quantity": quantity,
        "unit": unit,
        "conversion": conversion,
        "source": source,
        "timesS": _values(counts.times_s),
        "marks": {},
        "traces": traces,
    }
