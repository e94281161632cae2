"""Hub → city propagation latency, and how fast an unreachable city is marked and recovers.

Starts its own hub + one city (real control planes), the hub operator and the city's agent
in this process, then writes N SensorTypes on the hub and times each from the hub write to
the object present in the city (seen by a watch on the city's API server).
Baseline (same process): the same N objects written straight into the city, timed the same
way — the floor the federation's pull path is compared with.
Last line: one JSON object of the figures (aim: p99 ≤ 1 s).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from citynerve.operators.federation.embedded import EmbeddedFederation, city_condition
from citynerve.operators.localfed.federation import LocalFederation
from kubernetes import client, config, watch

N = 500
GROUP, VERSION = "citynerve.io", "v1alpha1"


def sensor_type(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "SensorType", "metadata": {"name": name},
        "spec": {
            "displayName": f"Bench {name}", "domain": "environment", "description": "Benchmark type.",
            "dataModel": {"subject": "dataModel.Environment", "entityType": "AirQualityObserved"},
            "properties": [{"name": "temperature", "unitCode": "CEL", "minimum": "-50", "maximum": "60"}],
        },
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def timed_writes(write_api: client.CustomObjectsApi, read_api: client.CustomObjectsApi,
                 prefix: str, n: int, pace: float) -> list[float]:
    """Write n SensorTypes through ``write_api``; return each one's latency until ``read_api`` sees it."""
    written: dict[str, float] = {}
    seen: dict[str, float] = {}
    done = threading.Event()

    def observe() -> None:
        stream = watch.Watch()
        for event in stream.stream(read_api.list_cluster_custom_object, GROUP, VERSION, "sensortypes",
                                   timeout_seconds=300):
            name = event["object"]["metadata"]["name"]
            if name.startswith(prefix) and name not in seen:
                seen[name] = time.monotonic()
                if len(seen) == n:
                    stream.stop()
                    break
        done.set()

    watcher = threading.Thread(target=observe, daemon=True)
    watcher.start()
    time.sleep(1.0)  # the watch is open before the first write
    for i in range(n):
        name = f"{prefix}{i:04d}"
        written[name] = time.monotonic()
        write_api.create_cluster_custom_object(GROUP, VERSION, "sensortypes", sensor_type(name))
        time.sleep(pace)
    done.wait(120)
    return [seen[k] - written[k] for k in written if k in seen]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="cn-bench-prop-") as tmp:
        local = LocalFederation(Path(tmp), cities=("shanghai",))
        local.up()
        embedded = EmbeddedFederation(local.kubeconfig, "hub", {"shanghai": "shanghai"},
                                      heartbeat_seconds=2, heartbeat_timeout_seconds=8, check_interval=1.0)
        try:
            embedded.start()
            hub = client.CustomObjectsApi(config.new_client_from_config(str(local.kubeconfig), context="hub"))
            city = client.CustomObjectsApi(config.new_client_from_config(str(local.kubeconfig),
                                                                         context="shanghai"))
            deadline = time.monotonic() + 60
            while city_condition(embedded.hub, "shanghai", "Ready") != "True":
                if time.monotonic() > deadline:
                    raise SystemExit("shanghai did not become Ready")
                time.sleep(0.5)

            direct = timed_writes(city, city, "direct-", N, pace=0.01)
            federated = timed_writes(hub, city, "fed-", N, pace=0.01)

            cluster = local.cluster("shanghai")
            stop_at = time.monotonic()
            cluster.stop_component("kube-apiserver")
            while city_condition(embedded.hub, "shanghai", "Reachable") != "False":
                time.sleep(0.2)
            marked_s = time.monotonic() - stop_at
            cluster.start_component("kube-apiserver")
            back_at = time.monotonic()
            while city_condition(embedded.hub, "shanghai", "Ready") != "True":
                time.sleep(0.2)
            reconverged_s = time.monotonic() - back_at
        finally:
            embedded.stop()
            local.down()

    figures = {
        "objects": N,
        "propagation_p50_s": round(statistics.median(federated), 3),
        "propagation_p99_s": round(percentile(federated, 0.99), 3),
        "propagation_max_s": round(max(federated), 3),
        "delivered": len(federated),
        "direct_p50_s": round(statistics.median(direct), 3),
        "direct_p99_s": round(percentile(direct, 0.99), 3),
        "ratio_p50_vs_direct": round(statistics.median(federated) / statistics.median(direct), 1),
        "unreachable_marked_s": round(marked_s, 1),
        "heartbeat_timeout_s": 8,
        "reconverged_s": round(reconverged_s, 1),
    }
    print(f"hub → city, {len(federated)}/{N} delivered: p50 {figures['propagation_p50_s']} s, "
          f"p99 {figures['propagation_p99_s']} s (direct write p50 {figures['direct_p50_s']} s)")
    print(f"unreachable marked after {marked_s:.1f} s (timeout 8 s); Ready again {reconverged_s:.1f} s "
          "after the API server returned")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
