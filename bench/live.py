"""Live scoring: a water-burst Scenario's windows scored by the loaded detector, in process and off a broker.

Phases, each with its baseline in the same run:

* **scorer**: a fitted Net3 detector (10 loggers, 15-min steps) scores a simulated week (a burst
  on its last day) step by step with its 192-step context (``WaterScorer``), against the naive way
  of re-scoring the whole history so far at every step. Steps/s per core, and the same burst found.
* **broker**: the same days as the fleets' stream workers publish them (one pressure and one supply
  window per step, Arrow messages on the windows streams of a real nats-server), consumed by the
  live loop (``LiveScoring``) with the Scenario's own broker identity and durable consumers as the
  city operator makes them. Publish of a step's last window → the step scored: p50/p99; windows/s
  through the broker against the scorer alone. Halfway through a new model version takes over
  (``swap``): windows unscored across the swap (steps published minus steps scored, target 0) and
  Incidents raised on the burst's day (target 1) and on the quiet days before it (false alarms).
* **load**: a registered version (on a real ``mlflow server``) downloaded, its sha256 checked and
  loaded with ``mlflow.pyfunc.load_model`` (``load_verified_detector``), against loading the same
  model from a local folder without the download and check.

Reading-to-Incident latency through the city operator is measured by the e2e test, not here: this
bench starts no API server. The last line printed is a JSON object of the figures.

    .venv/bin/python bench/live.py
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import numpy as np
from citynerve.models.detectors.water import KPA_PER_METRE_OF_WATER, WaterLeakDetector
from citynerve.operators.localfed import toolchain
from citynerve.workloads.dataplane.broker import (
    OPERATOR_USER,
    LocalBroker,
    hash_password,
    new_password,
    operator_user,
    scoring_user,
)
from citynerve.workloads.dataplane.names import HEADER_MSG_ID, windows_subject
from citynerve.workloads.dataplane.streams import ensure_fleet_streams, ensure_scoring_consumer
from citynerve.workloads.dataplane.windows import Window
from citynerve.workloads.live import BrokerAccess, LiveScoring
from citynerve.workloads.scoring import (
    PRESSURE_SENSOR_TYPE,
    SUPPLY_SENSOR_TYPE,
    Step,
    StepAssembler,
    WaterScorer,
)
from citynerve.workloads.sim.water import (
    LeakSpec,
    WaterRun,
    WaterScenarioSpec,
    choose_sensors,
    simulate_water,
)
from citynerve.workloads.water import ZONE_SUPPLY_TERMINAL, build_detector

CITY = "bench"
STEP_S = 900
DAY0_MS = 1_764_979_200_000  # a UTC midnight
CORES = os.cpu_count() or 1
QUIET_DAYS = 6  # a week of windows, the burst on its last day
FLEETS = [
    {"fleet": "pressure", "sensorType": PRESSURE_SENSOR_TYPE, "windowSeconds": STEP_S},
    {"fleet": "supply", "sensorType": SUPPLY_SENSOR_TYPE, "windowSeconds": STEP_S},
]


def say(text: str) -> None:
    sys.stderr.write(text + "\n")


def field_windows(runs: list[WaterRun]) -> list[list[Window]]:
    """Per step, the windows the two fleets' workers publish (kPa, m³/h), day after day."""
    out = []
    for day, run in enumerate(runs):
        for i, t in enumerate(run.times_s[:-1]):  # a day's last instant is the next day's first
            start = DAY0_MS + day * 86_400_000 + int(t * 1000)
            present = ~np.isnan(run.pressure[i])
            sensors = np.asarray(run.layout.pressure_nodes, dtype=object)[present]
            kpa = run.pressure[i][present] * KPA_PER_METRE_OF_WATER
            ones = np.ones(len(kpa), dtype=np.int64)
            supply = np.array([float(run.consumption()[i]) * 3600.0])
            out.append([
                Window(CITY, "pressure", "pressure", start, STEP_S, sensors, ones, kpa, kpa, kpa),
                Window(CITY, "supply", "flow", start, STEP_S, np.array([ZONE_SUPPLY_TERMINAL], dtype=object),
                       np.ones(1, dtype=np.int64), supply, supply, supply),
            ])
    return out


def phase_scorer(detector: WaterLeakDetector, steps: list[list[Window]]) -> dict[str, Any]:
    scorer = WaterScorer(detector)
    assembler = StepAssembler(scorer.bindings(FLEETS), STEP_S)
    ready: list[Step] = []
    for windows in steps:
        for window in windows:
            ready += assembler.add(window, now=0.0)[0]
    started = time.perf_counter()
    live = [e for step in ready for e in scorer.score(step)]
    live_s = time.perf_counter() - started
    # baseline: every step, the detector over everything so far (what re-running a batch job does)
    naive = WaterScorer(detector, context_steps=len(ready) + 1)
    started = time.perf_counter()
    batch = [e for step in ready for e in naive.score(step)]
    naive_s = time.perf_counter() - started
    say(f"scorer: {len(ready)} steps in {live_s:.2f} s ({len(live)} raised); naive {naive_s:.2f} s "
        f"({len(batch)} raised)")
    return {"steps": len(ready), "raised": len(live), "raised_naive": len(batch),
            "same_alarm": bool(live and batch and live[0].detected_at_s == batch[0].detected_at_s),
            "steps_per_s_per_core": len(ready) / live_s, "naive_steps_per_s_per_core": len(ready) / naive_s,
            "windows_per_s_per_core": 2 * len(ready) / live_s}


async def _publish(url: str, password: str, steps: list[list[Window]], sent_at: dict[int, float],
                   pace_s: float) -> None:
    nc = await nats.connect(url, user=OPERATOR_USER, password=password)
    js = nc.jetstream()
    for windows in steps:
        for window in windows:
            await js.publish(windows_subject(CITY, window.fleet, window.prop), window.encode(),
                             headers={HEADER_MSG_ID: window.msg_id})
        sent_at[windows[0].start_ms] = time.perf_counter()
        if pace_s:
            await asyncio.sleep(pace_s)
    await nc.close()


async def _provision(url: str, password: str, consumer: str) -> None:
    nc = await nats.connect(url, user=OPERATOR_USER, password=password)
    js = nc.jetstream()
    for fleet in ("pressure", "supply"):
        await ensure_fleet_streams(js, CITY, fleet, window_s=STEP_S, allowed_lateness_s=0, retention_hours=72)
        await ensure_scoring_consumer(js, fleet, consumer, datetime.now(UTC) - timedelta(hours=1))
    await nc.close()


def phase_broker(detector: WaterLeakDetector, steps: list[list[Window]], folder: Path) -> dict[str, Any]:
    operator_password, scoring_password = new_password(), new_password()
    consumer = "scoring-bench"
    users = [operator_user(hash_password(operator_password)),
             scoring_user(CITY, consumer, ["pressure", "supply"], hash_password(scoring_password))]
    broker = LocalBroker(folder / "broker", CITY, nats_server=toolchain.binary("nats-server"))
    broker.start(users)
    try:
        asyncio.run(_provision(broker.url, operator_password, consumer))
        raised: list[Any] = []
        scored_at: dict[int, float] = {}
        first = WaterScorer(detector)

        class Timed(WaterScorer):
            def score(self, step: Step) -> list[Any]:
                events = super().score(step)
                scored_at[step.start_ms] = time.perf_counter()
                return events

        scorer = Timed(detector)
        scorer.adopt(first)
        loop = LiveScoring(BrokerAccess(broker.url, consumer, scoring_password, consumer), scorer, "v1",
                           FLEETS, lambda event, _scorer, tag: raised.append((event, tag)), max_wait_s=30)
        sent_at: dict[int, float] = {}
        half = len(steps) - 96  # the last day (the burst's) is published at a steady pace
        # throughput: the days before, waiting on the streams when the workload starts (as after a
        # restart); then a swap; then the burst's day at 20 steps/s for the latency of each step
        asyncio.run(_publish(broker.url, operator_password, steps[:half], sent_at, 0.0))
        started = time.perf_counter()
        loop.start()
        first = steps[half - 2][0].start_ms  # the last complete step of the waiting part
        deadline = time.monotonic() + 120
        while first not in scored_at and time.monotonic() < deadline:
            time.sleep(0.01)
        elapsed = scored_at[first] - started
        loop.swap(Timed(detector), "v2")
        asyncio.run(_publish(broker.url, operator_password, steps[half:], sent_at, 0.05))
        # the last step completes once both fleets passed it, or after the loop's wait
        deadline = time.monotonic() + 60
        while len(scored_at) < len(steps) and time.monotonic() < deadline:
            time.sleep(0.05)
        loop.stop()
        if loop.error is not None:
            raise loop.error
        latencies = [scored_at[k] - sent_at[k] for k in list(sent_at)[half:-1] if k in scored_at]
        tags = sorted({tag for _, tag in raised})
        burst_day_s = steps[half][0].start_ms / 1000
        on_burst_day = [e for e, _ in raised if e.detected_at_s >= burst_day_s]
        say(f"broker: {len(scored_at)}/{len(steps)} steps scored in {elapsed:.2f} s, {len(raised)} raised by "
            f"{tags}, swaps {loop.progress.swaps}")
        return {"steps_published": len(steps), "steps_scored": len(scored_at),
                "windows_unscored_across_swap": 2 * (len(steps) - len(scored_at)),
                "incidents_burst_day": len(on_burst_day),
                "incidents_quiet_days": len(raised) - len(on_burst_day),
                "swaps": loop.progress.swaps,
                "windows_per_s_through_broker": 2 * (half - 1) / elapsed,
                "latency_p50_ms": 1000 * statistics.median(latencies),
                "latency_p99_ms": 1000 * float(np.percentile(latencies, 99))}
    finally:
        broker.stop()


def phase_load(folder: Path) -> dict[str, Any]:
    from citynerve.models.pyfunc import load_detector, load_verified_detector  # noqa: PLC0415
    from citynerve.models.registry import TRAINER_IDENTITY, resolve_model_version  # noqa: PLC0415
    from citynerve.models.training import WaterTrainingConfig, train_water_detector  # noqa: PLC0415
    from citynerve.operators.localfed.mlflow_server import LocalMlflow  # noqa: PLC0415

    server = LocalMlflow(folder / "mlflow")
    server.start()
    server.use_identity(TRAINER_IDENTITY)
    try:
        trained = train_water_detector(server.url, "bench-burst", WaterTrainingConfig(evaluation_leaks=2),
                                       alias=None)
        version, digest = trained.model.version, trained.model.artifact_digest
        loads = []
        for _ in range(3):
            verified = load_verified_detector(server.url, "bench-burst", version, digest, "the bench's")
            loads.append(verified.load_seconds)
        local = folder / "local"
        resolve_model_version(server.url, "bench-burst", version=version, destination=local)
        model_dir = next(local.rglob("MLmodel")).parent
        plain = []
        for _ in range(3):
            started = time.perf_counter()
            load_detector(model_dir)
            plain.append(time.perf_counter() - started)
        say(f"load: verified {min(loads):.2f} s, local pyfunc load {min(plain):.2f} s")
        return {"model_load_s": min(loads), "local_load_s": min(plain)}
    finally:
        server.stop()


def main() -> int:
    base = WaterScenarioSpec(network="Net3", sensors=choose_sensors("Net3", 10), seed=3)
    say("fitting the detector (Net3, 3 days of history)…")
    detector = build_detector(base, history_days=3)
    # one continuous week (tanks carry over from day to day, as in a city), the burst on its last day
    leak = LeakSpec(node="123", area_m2=0.02, start_s=QUIET_DAYS * 86400 + 9 * 3600)
    week = simulate_water(replace(base, duration_s=(QUIET_DAYS + 1) * 86400, leaks=(leak,), seed=7))
    steps = field_windows([week])
    figures: dict[str, Any] = {"cores": CORES, "window_s": STEP_S}
    scorer = phase_scorer(detector, steps)
    figures.update({f"scorer_{k}": v for k, v in scorer.items()})
    with tempfile.TemporaryDirectory(prefix="citynerve-bench-live-") as tmp:
        broker = phase_broker(detector, steps, Path(tmp))
        figures.update(broker)
        figures["ratio_broker_vs_scorer"] = broker["windows_per_s_through_broker"] / (
            scorer["windows_per_s_per_core"] * CORES)
        figures.update(phase_load(Path(tmp)))
    figures["ratio_vs_naive"] = scorer["steps_per_s_per_core"] / scorer["naive_steps_per_s_per_core"]
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
