"""Model promotion figures: end-to-end promotion time, and MLflow logging throughput.

1. Promotion time: from ``citynerve models promote`` (canary Shanghai, then Chengdu, soak 0) to
   every city *running* the new version — its AnalyticsModel Ready for the current spec, with
   the version resolved and its artifact digest verified by the city operator. On a local
   federation this script starts itself (hub + 2 cities, ``EmbeddedFederation``, a city
   operator per city) with a real MLflow server. Promotions alternate between two versions.
2. Logging throughput of the training entry point's metric logging (``log_metrics``):
   ``log_batch`` (what training uses) against the baseline of one ``log_metric`` call each.

Last line: one JSON object of the figures.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

PROMOTIONS = 4
METRICS_LOGGED = 2000
CITIES = ("shanghai", "chengdu")
MODEL = "bench-water-burst-detector"
GROUP, VERSION = "citynerve.io", "v1alpha1"


def running_version(api: Any, name: str) -> str | None:
    from kubernetes import client  # noqa: PLC0415

    try:
        obj = client.CustomObjectsApi(api).get_namespaced_custom_object(
            GROUP, VERSION, "citynerve", "analyticsmodels", name
        )
    except client.ApiException:
        return None
    ready = next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"), {})
    if ready.get("status") != "True" or ready.get("observedGeneration") != obj["metadata"]["generation"]:
        return None
    return str(obj["status"].get("resolvedVersion"))


def logging_throughput(url: str) -> dict[str, float]:
    from citynerve.models.registry import registry_client  # noqa: PLC0415
    from citynerve.models.training import log_metrics  # noqa: PLC0415

    client = registry_client(url)
    experiment = client.create_experiment(f"bench-logging-{int(time.time())}")
    entries = [
        (key, float(i), i)
        for i in range(METRICS_LOGGED // 4)
        for key in (
            "scenarioDetected",
            "scenarioDelaySeconds",
            "scenarioLocalisationErrorMetres",
            "detectionRate",
        )
    ]
    figures = {}
    for label, batch in (("log_metric", False), ("log_batch", True)):
        run = client.create_run(experiment)
        start = time.monotonic()
        logged = log_metrics(client, run.info.run_id, entries, batch=batch)
        figures[label] = logged / (time.monotonic() - start)
        client.set_terminated(run.info.run_id)
    return figures


def main() -> None:
    from citynerve.models.registry import (  # noqa: PLC0415
        TRAINER_IDENTITY,
        register_logged_artifact,
        set_model_alias,
    )
    from citynerve.models.training import MODEL_ARTIFACT_PATH, train_water_detector  # noqa: PLC0415
    from citynerve.operators.city.config import CityOptions  # noqa: PLC0415
    from citynerve.operators.city.handlers import build_registry as city_registry  # noqa: PLC0415
    from citynerve.operators.cli import main as citynerve  # noqa: PLC0415
    from citynerve.operators.federation.embedded import EmbeddedFederation  # noqa: PLC0415
    from citynerve.operators.hub.promotion import model_object_name  # noqa: PLC0415
    from citynerve.operators.localfed import toolchain  # noqa: PLC0415
    from citynerve.operators.localfed.federation import LocalFederation  # noqa: PLC0415
    from citynerve.operators.localfed.mlflow_server import LocalMlflow  # noqa: PLC0415
    from citynerve.operators.runtime import InProcessOperator, KubeTarget, OperatorOptions  # noqa: PLC0415
    from kubernetes import client, config  # noqa: PLC0415

    toolchain.ensure()
    with tempfile.TemporaryDirectory(prefix="cn-bench-promotion-") as tmp:
        mlflow = LocalMlflow(Path(tmp) / "mlflow")
        mlflow.start()
        mlflow.use_identity(TRAINER_IDENTITY)  # the server refuses requests without credentials
        local = LocalFederation(Path(tmp) / "fed", cities=CITIES)
        fed: EmbeddedFederation | None = None
        operators: list[InProcessOperator] = []
        try:
            started = time.monotonic()
            trained = train_water_detector(mlflow.url, MODEL, alias="champion")
            train_s = time.monotonic() - started
            again = register_logged_artifact(
                mlflow.url, MODEL, trained.run_id, MODEL_ARTIFACT_PATH, trained.model.artifact_digest
            )
            versions = [again.version, trained.model.version]
            throughput = logging_throughput(mlflow.url)

            local.up()
            os.environ["MLFLOW_TRACKING_URI"] = mlflow.url
            fed = EmbeddedFederation(
                local.kubeconfig,
                "hub",
                {c: c for c in CITIES},
                heartbeat_seconds=2,
                heartbeat_timeout_seconds=8,
                check_interval=1.0,
            ).start()
            apis = {c: config.new_client_from_config(str(local.kubeconfig), context=c) for c in CITIES}
            for city in CITIES:
                client.CoreV1Api(apis[city]).create_namespace({"metadata": {"name": "citynerve"}})
                options = OperatorOptions(
                    f"city-{city}", KubeTarget(local.kubeconfig, city), namespaces=("citynerve",)
                )
                operators.append(
                    InProcessOperator(
                        options,
                        city_registry(
                            options,
                            CityOptions(
                                city=city, mlflow_url=mlflow.url, resync_seconds=2.0, model_cache_seconds=2.0
                            ),
                        ),
                    ).start()
                )
            name = model_object_name(MODEL)
            times: list[float] = []
            for i in range(PROMOTIONS):
                version = versions[i % 2]
                set_model_alias(mlflow.url, MODEL, "champion", versions[(i + 1) % 2])
                start = time.monotonic()
                code = citynerve(
                    [
                        "models",
                        "promote",
                        MODEL,
                        "--version",
                        version,
                        "--canary",
                        "shanghai",
                        "--soak",
                        "0",
                        "--promotion-name",
                        f"bench-{i}",
                        "--kubeconfig",
                        str(local.kubeconfig),
                        "--context",
                        "hub",
                        "--wait",
                        "--wait-timeout",
                        "180",
                    ]
                )
                if code != 0:
                    raise RuntimeError(f"promotion {i} of version {version} did not complete (exit {code})")
                while not all(running_version(apis[c], name) == version for c in CITIES):
                    if time.monotonic() - start > 180:
                        raise TimeoutError(f"cities not running version {version} within 180 s")
                    time.sleep(0.05)
                times.append(time.monotonic() - start)
                print(
                    f"promotion {i}: version {version} running in {', '.join(CITIES)} after {times[-1]:.2f} s"
                )
        finally:
            for operator in operators:
                operator.stop()
            if fed is not None:
                fed.stop()
            local.down()
            mlflow.stop()

    speedup = throughput["log_batch"] / throughput["log_metric"]
    print(f"training (Net3, 4 leaks, incl. Ray start): {train_s:.1f} s")
    print(
        f"promotion, command → all cities running (canary first, soak 0): "
        f"median {statistics.median(times):.2f} s, max {max(times):.2f} s over {len(times)}"
    )
    print(
        f"MLflow metric logging: log_batch {throughput['log_batch']:.0f}/s vs log_metric "
        f"{throughput['log_metric']:.0f}/s ({speedup:.1f}x)"
    )
    print(
        json.dumps(
            {
                "promotion_seconds_median": round(statistics.median(times), 3),
                "promotion_seconds_max": round(max(times), 3),
                "promotion_seconds": [round(t, 3) for t in times],
                "promotions": len(times),
                "cities": len(CITIES),
                "soak_seconds": 0,
                "training_seconds": round(train_s, 1),
                "mlflow_log_batch_metrics_per_s": round(throughput["log_batch"], 1),
                "mlflow_log_metric_metrics_per_s": round(throughput["log_metric"], 1),
                "mlflow_batch_speedup": round(speedup, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
