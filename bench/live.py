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
ROOT = Path(__file__).resolve().parents[1]
GROUP, VERSION = "citynerve.io", "v1alpha1"
API = f"{GROUP}/{VERSION}"
SCENARIOS = 5  # live scenarios made at once in the end-to-end phase
PACE_S = 0.2  # the end-to-end drill's pace: a simulated quarter-hour every 0.2 s
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


def phase_load(folder: Path, server: Any) -> dict[str, Any]:
    from citynerve.models.pyfunc import load_detector, load_verified_detector  # noqa: PLC0415
    from citynerve.models.registry import resolve_model_version  # noqa: PLC0415
    from citynerve.models.training import WaterTrainingConfig, train_water_detector  # noqa: PLC0415

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
    figures: dict[str, Any] = {"model_load_s": min(loads), "local_load_s": min(plain)}
    figures.update(phase_end_to_end(folder, server.url, "bench-burst", version, digest))
    return figures


def _manifests(loggers: int) -> list[dict[str, Any]]:
    def fleet(name: str, type_name: str, count: int) -> dict[str, Any]:
        return {"apiVersion": API, "kind": "SensorFleet", "metadata": {"name": name},
                "spec": {"sensorType": type_name, "district": "jinjiang", "count": count, "owner": "operator",
                         "protocol": "MQTT", "samplingIntervalSeconds": STEP_S, "windowSeconds": STEP_S,
                         "allowedLatenessSeconds": 0}}

    return [fleet("zone-pressure", PRESSURE_SENSOR_TYPE, loggers),
            fleet("zone-supply", SUPPLY_SENSOR_TYPE, 1)]


def phase_end_to_end(
    folder: Path, mlflow_url: str, registered: str, version: str, digest: str
) -> dict[str, Any]:
    """A city's control plane, broker, operator (local Ray), fleet workers and MLflow; SCENARIOS live
    Scenarios on the same two fleets (at most four hold their 0.5 CPU on the 2-CPU Ray); a drill
    day with a burst published over MQTT step by step; each Incident's latency from the publish
    of the reading that closed the window it was raised at (the window's own length excluded) to
    the Incident seen in the city's API."""
    import threading  # noqa: PLC0415

    import yaml  # noqa: PLC0415
    from citynerve.operators.city.broker import BrokerOptions  # noqa: PLC0415
    from citynerve.operators.city.config import CityOptions  # noqa: PLC0415
    from citynerve.operators.city.handlers import build_registry  # noqa: PLC0415
    from citynerve.operators.federation.embedded import install_crds  # noqa: PLC0415
    from citynerve.operators.localfed.cluster import LocalCluster  # noqa: PLC0415
    from citynerve.operators.localfed.pods import LocalPods  # noqa: PLC0415
    from citynerve.operators.runtime import InProcessOperator, KubeTarget, OperatorOptions  # noqa: PLC0415
    from citynerve.workloads.ingest.sensor_type import SensorType  # noqa: PLC0415
    from citynerve.workloads.sim.field import (  # noqa: PLC0415
        FleetLogin,
        MqttFieldSource,
        water_field_batches,
        yesterday_midnight_ms,
    )
    from kubernetes import client, config  # noqa: PLC0415

    city, namespace = "chengdu", "live"
    cluster = LocalCluster(city, folder / "cluster", with_broker=True)
    cluster.start()
    operator = pods = None
    try:
        install_crds(KubeTarget(cluster.kubeconfig, city))
        api = config.new_client_from_config(str(cluster.kubeconfig), context=city)
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        core.create_namespace({"metadata": {"name": namespace}})
        types = {}
        for name in (PRESSURE_SENSOR_TYPE, SUPPLY_SENSOR_TYPE):
            body = yaml.safe_load((ROOT / "samples" / "sensortypes" / f"{name}.yaml").read_text())
            types[name] = SensorType.from_resource(name, body["spec"])
            custom.create_cluster_custom_object(GROUP, VERSION, "sensortypes", body)
        target = KubeTarget(cluster.kubeconfig, city)
        options = OperatorOptions(f"city-{city}", target, namespaces=(namespace,))
        broker = BrokerOptions(cluster.broker.url, cluster.broker_key_file, namespace)
        city_options = CityOptions(city=city, mlflow_url=mlflow_url, resync_seconds=4.0,
                                   model_cache_seconds=2.0, broker=broker)
        operator = InProcessOperator(options, build_registry(options, city_options)).start()
        pods = LocalPods(api, [namespace], cluster.broker, namespace, folder / "pods").start()
        base = WaterScenarioSpec(network="Net3", sensors=choose_sensors("Net3", 10))
        assert base.sensors is not None
        manifests = _manifests(len(base.sensors.pressure_nodes))
        manifests.append({"apiVersion": API, "kind": "AnalyticsModel", "metadata": {"name": "burst-detector"},
                          "spec": {"registeredModel": registered, "version": version,
                                   "expectedDigest": digest}})
        for i in range(SCENARIOS):
            manifests.append({"apiVersion": API, "kind": "Scenario", "metadata": {"name": f"mains-{i}"},
                              "spec": {"kind": "water-burst", "mode": "live",
                                       "fleets": [{"name": "zone-pressure"}, {"name": "zone-supply"}],
                                       "models": [{"name": "burst-detector"}],
                                       "thresholds": [{"metric": "pressureDropKpa", "unitCode": "KPA",
                                                       "warning": 1, "alarm": 500}]}})
        plural = {"SensorFleet": "sensorfleets", "AnalyticsModel": "analyticsmodels", "Scenario": "scenarios"}
        for body in manifests:
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural[body["kind"]], body)

        def ready() -> dict[str, str]:
            out = {}
            for item in custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "scenarios")["items"]:
                cond = next((c for c in (item.get("status") or {}).get("conditions") or []
                             if c["type"] == "Ready"), {})
                said = f"{cond.get('status')} {cond.get('reason')}: {cond.get('message')}"
                out[item["metadata"]["name"]] = said
            return out

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            states = ready()
            running = sum(1 for s in states.values() if s.startswith("True"))
            if running >= min(SCENARIOS, 4) and len(pods.running()) == 2:
                break
            time.sleep(1)
        time.sleep(8)  # two resyncs more: whatever else could start has
        states = ready()
        at_once = sum(1 for s in states.values() if s.startswith("True"))
        waiting = [s for s in states.values() if not s.startswith("True")]
        say(f"end to end: {at_once} of {SCENARIOS} live scenarios running; others: {waiting}")

        def secret(name: str) -> str:
            import base64  # noqa: PLC0415

            data = core.read_namespaced_secret(name, namespace).data or {}
            return base64.b64decode(data["password"]).decode()

        leak = LeakSpec(node="123", area_m2=0.02, start_s=9 * 3600)
        run = simulate_water(replace(base, leaks=(leak,), seed=7))
        origin = yesterday_midnight_ms()
        steps = list(water_field_batches(run, types[PRESSURE_SENSOR_TYPE], types[SUPPLY_SENSOR_TYPE], origin))
        seen: dict[str, tuple[float, dict[str, Any]]] = {}
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                listed = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "incidents")
                for item in listed["items"]:
                    seen.setdefault(item["metadata"]["name"], (time.perf_counter(), item))
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        published: list[float] = []
        logins = [FleetLogin("zone-pressure", secret("zone-pressure-mqtt")),
                  FleetLogin("zone-supply", secret("zone-supply-mqtt"))]
        with MqttFieldSource(cluster.broker.mqtt_host, cluster.broker.mqtt_port, city, *logins) as source:
            for step in steps:
                source.publish([step])
                published.append(time.perf_counter())
                time.sleep(PACE_S)
        deadline = time.monotonic() + 60
        while len({i["spec"]["scenarioRef"]["name"] for _, i in seen.values()}) < at_once and (
                time.monotonic() < deadline):
            time.sleep(0.1)
        stop.set()
        watcher.join(5)
        latencies, delays = [], []
        for at, item in seen.values():
            last = datetime.fromisoformat(item["spec"]["decidedBy"]["lastWindow"]).timestamp()
            k = round((last * 1000 - origin) / (STEP_S * 1000))
            closed_by = published[min(k + 1, len(published) - 1)]
            latencies.append(at - closed_by)
            delays.append(k - leak.start_s // STEP_S)
        say(f"end to end: {len(seen)} Incidents, latency {[round(x, 3) for x in latencies]} s, "
            f"detected {delays} windows after the burst's")
        return {"live_scenarios_at_once": at_once, "live_scenarios_created": SCENARIOS,
                "incidents": len(seen),
                "reading_to_incident_p50_s": statistics.median(latencies) if latencies else float("nan"),
                "reading_to_incident_max_s": max(latencies) if latencies else float("nan"),
                "reading_to_incident_samples": len(latencies),
                "detection_delay_windows": statistics.median(delays) if delays else float("nan")}
    finally:
        if pods is not None:
            pods.stop()
        if operator is not None:
            operator.stop()
        _stop_ray()
        cluster.stop()


def _stop_ray() -> None:
    """The scenarios' detached actors, then the local Ray the operator started (before the
    interpreter exits: Ray's worker must not be shut down under a thread still using it)."""
    import ray  # noqa: PLC0415

    if not ray.is_initialized():
        return
    for entry in ray.util.list_named_actors(all_namespaces=True):
        try:
            ray.kill(ray.get_actor(entry["name"], namespace=entry["namespace"]))
        except ValueError:
            continue
    ray.shutdown()


def main() -> int:
    from citynerve.models.registry import TRAINER_IDENTITY  # noqa: PLC0415
    from citynerve.operators.localfed.mlflow_server import LocalMlflow  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="citynerve-bench-live-") as tmp:
        # first: its identity is in the environment before Ray starts, so Ray's workers have it
        server = LocalMlflow(Path(tmp) / "mlflow")
        server.start()
        server.use_identity(TRAINER_IDENTITY)
        try:
            return _main(Path(tmp), server)
        finally:
            server.stop()


def _main(folder: Path, server: Any) -> int:
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
    broker = phase_broker(detector, steps, folder)
    figures.update(broker)
    figures["ratio_broker_vs_scorer"] = broker["windows_per_s_through_broker"] / (
        scorer["windows_per_s_per_core"] * CORES)
    figures.update(phase_load(folder, server))
    figures["ratio_vs_naive"] = scorer["steps_per_s_per_core"] / scorer["naive_steps_per_s_per_core"]
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
