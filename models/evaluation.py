"""How a fitted water-burst detector is scored, and how its evaluation data set is named.

The evaluation set is simulated: one scenario per leak (a leak or burst opening mid-day on a
junction of the network) plus leak-free days. Its *identity* — network, leaks, seeds and
durations — is hashed, so a metric recorded in MLflow always says which data produced it,
and two evaluations on the same set compare like with like.

Metrics are camelCase, as gates (``ModelPromotion.spec.gates``) name them:

============================  ====================================================================
``detectionRate``             leaks detected (an alarm at or after onset) / leaks
``detectionDelaySeconds``     median time from onset to alarm, over detected leaks
``localisationErrorMetres``   median pipe distance from the leak to the junction named, detected leaks
``localisationErrorHops``     the same in pipes (graph hops)
``falseAlarmsPerDay``         alarms before onset or on leak-free days, per simulated day observed
``scenarios``                 leak scenarios evaluated
============================  ====================================================================

Medians over no detection are not recorded (a gate on them then fails as "not recorded").
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from citynerve.models.detectors.water import WaterLeakDetector
from citynerve.workloads.sim.water import (
    LeakSpec,
    WaterScenarioSpec,
    graph_distances,
    model_baseline,
    run_water_scenarios,
)
from citynerve.workloads.water import leak_set, window_of


@dataclass(frozen=True)
class EvaluationSet:
    """A simulated evaluation data set: leak scenarios and leak-free days on one network."""

    network: str
    leaks: tuple[LeakSpec, ...]
    clean_days: int
    seed: int
    duration_s: int = 24 * 3600
    hydraulic_step_s: int = 900

    @classmethod
    def simulated(cls, network: str, leaks: int, leak_seed: int, clean_days: int, seed: int) -> EvaluationSet:
        return cls(network, tuple(leak_set(network, leaks, seed=leak_seed)), clean_days, seed)

    def identity(self) -> dict[str, Any]:
        """Everything that determines the data, as plain JSON."""
        return {
            "network": self.network,
            "leaks": [asdict(leak) for leak in self.leaks],
            "cleanDays": self.clean_days,
            "seed": self.seed,
            "durationSeconds": self.duration_s,
            "hydraulicStepSeconds": self.hydraulic_step_s,
        }

    def digest(self) -> str:
        """``sha256:<hex>`` of the canonical identity: the data set's name in MLflow."""
        canonical = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Evaluation:
    """Scores of one detector on one evaluation set."""

    metrics: dict[str, float]
    per_scenario: list[dict[str, Any]]
    dataset_digest: str


def evaluate_water_detector(
    detector: WaterLeakDetector, base: WaterScenarioSpec, evaluation: EvaluationSet
) -> Evaluation:
    """Run every leak as its own scenario plus the leak-free days (in parallel) and score ``detector``."""
    base = replace(
        base,
        network=evaluation.network,
        duration_s=evaluation.duration_s,
        hydraulic_step_s=evaluation.hydraulic_step_s,
    )
    model = model_baseline(base)
    leak_specs = [
        replace(base, leaks=(leak,), seed=evaluation.seed + i) for i, leak in enumerate(evaluation.leaks)
    ]
    clean_specs = [
        replace(base, leaks=(), seed=evaluation.seed + 500 + d) for d in range(evaluation.clean_days)
    ]
    runs = run_water_scenarios(leak_specs + clean_specs)
    false_alarms = 0
    observed_s = 0.0
    rows: list[dict[str, Any]] = []
    for leak, run in zip(evaluation.leaks, runs[: len(evaluation.leaks)], strict=True):
        events = detector.predict(window_of(run, model))
        false_alarms += sum(1 for e in events if e.detected_at_s < leak.start_s)
        observed_s += leak.start_s
        hit = next((e for e in events if e.detected_at_s >= leak.start_s), None)
        row: dict[str, Any] = {
            "node": leak.node,
            "areaM2": leak.area_m2,
            "kind": leak.kind,
            "detected": False,
        }
        if hit is not None:
            hops, metres = graph_distances(evaluation.network, leak.node, [hit.location.asset_id])
            row.update(
                detected=True,
                delaySeconds=hit.detected_at_s - leak.start_s,
                locatedAt=hit.location.asset_id,
                hops=float(hops[0]),
                metres=float(metres[0]),
            )
        rows.append(row)
    for run in runs[len(evaluation.leaks) :]:
        false_alarms += len(detector.predict(window_of(run, model)))
        observed_s += evaluation.duration_s
    found = [r for r in rows if r["detected"]]
    metrics: dict[str, float] = {
        "scenarios": float(len(rows)),
        "detectionRate": len(found) / max(len(rows), 1),
        "falseAlarmsPerDay": false_alarms / max(observed_s / 86400.0, 1e-9),
    }
    if found:
        metrics["detectionDelaySeconds"] = float(np.median([r["delaySeconds"] for r in found]))
        metrics["localisationErrorMetres"] = float(np.median([r["metres"] for r in found]))
        metrics["localisationErrorHops"] = float(np.median([r["hops"] for r in found]))
    return Evaluation(metrics, rows, evaluation.digest())
