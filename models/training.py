"""Training and evaluation entry points: fit a detector, score it, log it all, register it.

``train_water_detector`` is what ``citynerve models train`` runs. In one MLflow run it logs

* parameters (network, sensors, history, detector parameters),
* metrics (``citynerve.models.evaluation``: ``detectionRate``, ``detectionDelaySeconds``, …, and
  per-scenario values as steps), in ``log_batch`` calls,
* the evaluation data set as a run input (name, digest = hash of network, leaks and seeds) and as
  the tag ``citynerve.io/evaluation-dataset``,
* artifacts: the detector as an MLflow pyfunc model (``model/``, with a signature) and the
  evaluation report (``evaluation/report.json``),

then registers ``model/`` as a new version with tags (scenario kind, training data, code
version) and its artifact digest, and points an alias (``challenger`` by default) at it.
``evaluate_registered`` re-scores a registered version on another evaluation set, after
verifying its artifact digest.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from citynerve.models.detectors.water import WaterLeakDetector
from citynerve.models.evaluation import Evaluation, EvaluationSet, evaluate_water_detector
from citynerve.models.pyfunc import load_detector, save_detector
from citynerve.models.registry import (
    DIGEST_TAG,
    SCENARIO_KIND_TAG,
    ModelResolutionError,
    ResolvedModel,
    artifact_digest,
    ensure_experiment,
    read_model_version,
    register_logged_artifact,
    registry_client,
    resolve_model_version,
)
from citynerve.workloads.sim.water import WaterScenarioSpec, choose_sensors, model_baseline, simulate_water
from citynerve.workloads.water import WaterHistory, build_detector, build_detector_from_history, window_of

EXPERIMENT = "citynerve-training"
TRAINING_DATA_TAG = "citynerve.io/training-data"
EVALUATION_DATASET_TAG = "citynerve.io/evaluation-dataset"
CODE_VERSION_TAG = "citynerve.io/code-version"
MODEL_ARTIFACT_PATH = "model"
_BATCH_LIMIT = 1000  # MLflow's limit on metrics in one log_batch call


@dataclass(frozen=True)
class WaterTrainingConfig:
    """What a water-burst detector is trained and evaluated on; defaults train in seconds."""

    network: str = "Net3"
    pressure_sensors: int = 10
    history_days: int = 3
    seed: int = 0
    evaluation_leaks: int = 4
    evaluation_leak_seed: int = 1
    evaluation_clean_days: int = 1
    evaluation_seed: int = 100
    params: Mapping[str, float] = field(default_factory=dict)
    #: fit on the zone's stored window history (its fleets' history volumes) instead of simulated
    #: leak-free days; the loggers are then the pressure fleet's terminals
    history: WaterHistory | None = None

    def base(self) -> WaterScenarioSpec:
        return WaterScenarioSpec(
            network=self.network, sensors=choose_sensors(self.network, self.pressure_sensors), seed=self.seed
        )

    def evaluation_set(self) -> EvaluationSet:
        return EvaluationSet.simulated(
            self.network,
            self.evaluation_leaks,
            self.evaluation_leak_seed,
            self.evaluation_clean_days,
            self.evaluation_seed,
        )

    def training_identity(self) -> dict[str, Any]:
        """The training data: leak-free field history simulated with these seeds."""
        return {
            "network": self.network,
            "pressureSensors": self.pressure_sensors,
            "historyDays": self.history_days,
            "historySeeds": [self.seed + 1000 + d for d in range(self.history_days)],
        }

    def logged_params(self) -> dict[str, str]:
        if self.history is not None:
            return {
                "network": self.network,
                "trainingData": "window-history",
                "pressureFleet": self.history.pressure_fleet,
                "supplyFleet": self.history.supply_fleet,
                "evaluationLeaks": str(self.evaluation_leaks),
                "evaluationCleanDays": str(self.evaluation_clean_days),
                **{f"detector.{k}": str(v) for k, v in sorted(self.params.items())},
            }
        return {
            "network": self.network,
            "pressureSensors": str(self.pressure_sensors),
            "historyDays": str(self.history_days),
            "seed": str(self.seed),
            "evaluationLeaks": str(self.evaluation_leaks),
            "evaluationCleanDays": str(self.evaluation_clean_days),
            **{f"detector.{k}": str(v) for k, v in sorted(self.params.items())},
        }


@dataclass(frozen=True)
class TrainingResult:
    """A trained, evaluated and registered model version."""

    model: ResolvedModel
    run_id: str
    metrics: dict[str, float]
    dataset_digest: str
    metrics_logged: int
    seconds: float


def code_version() -> str:
    """The citynerve version, and the git commit it was built from when that is known."""
    version = importlib.metadata.version("citynerve")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{commit}" if commit else version


def _digest_of(identity: Mapping[str, Any]) -> str:
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def metric_entries(evaluation: Evaluation) -> list[tuple[str, float, int]]:
    """Summary metrics (step 0) and one value per scenario (step = scenario index)."""
    entries = [(k, v, 0) for k, v in sorted(evaluation.metrics.items())]
    for i, row in enumerate(evaluation.per_scenario):
        entries.append(("scenarioDetected", 1.0 if row["detected"] else 0.0, i))
        if row["detected"]:
            entries.append(("scenarioDelaySeconds", float(row["delaySeconds"]), i))
            entries.append(("scenarioLocalisationErrorMetres", float(row["metres"]), i))
    return entries


def log_metrics(
    client: Any, run_id: str, entries: Sequence[tuple[str, float, int]], *, batch: bool = True
) -> int:
    """Log metrics in ``log_batch`` calls of up to 1000 (or, as a baseline, one call each)."""
    from mlflow.entities import Metric  # noqa: PLC0415

    stamp = int(time.time() * 1000)
    if not batch:
        for key, value, step in entries:
            client.log_metric(run_id, key, value, timestamp=stamp, step=step)
        return len(entries)
    metrics = [Metric(key, value, stamp, step) for key, value, step in entries]
    for start in range(0, len(metrics), _BATCH_LIMIT):
        client.log_batch(run_id, metrics=metrics[start : start + _BATCH_LIMIT])
    return len(metrics)


def _log_dataset(client: Any, run_id: str, evaluation_set: EvaluationSet, digest: str) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag  # noqa: PLC0415

    name = f"{evaluation_set.network}-leaks{len(evaluation_set.leaks)}-seed{evaluation_set.seed}"
    dataset = Dataset(
        name=name,
        digest=digest.removeprefix("sha256:")[:36],
        source_type="citynerve-simulation",
        source=json.dumps({"simulator": "wntr", **evaluation_set.identity()}, sort_keys=True),
    )
    client.log_inputs(
        run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "evaluation")])]
    )


def train_water_detector(
    tracking_uri: str,
    model_name: str = "water-burst-detector",
    config: WaterTrainingConfig | None = None,
    alias: str | None = "challenger",
    *,
    batch_logging: bool = True,
) -> TrainingResult:
    """Fit a water-burst detector on simulated history (or on the zone's stored window history),
    evaluate it, log and register it."""
    started = time.monotonic()
    config = config or WaterTrainingConfig()
    base = config.base()
    if config.history is not None:
        detector, base, identity = build_detector_from_history(config.history, base, **dict(config.params))
    else:
        detector = build_detector(base, history_days=config.history_days, **dict(config.params))
        identity = config.training_identity()
    evaluation_set = config.evaluation_set()
    evaluation = evaluate_water_detector(detector, base, evaluation_set)
    training_digest = _digest_of(identity)
    tags = {
        SCENARIO_KIND_TAG: "water-burst",
        TRAINING_DATA_TAG: training_digest,
        EVALUATION_DATASET_TAG: evaluation.dataset_digest,
        CODE_VERSION_TAG: code_version(),
    }
    client = registry_client(tracking_uri)
    experiment_id = ensure_experiment(client, EXPERIMENT)
    run = client.create_run(experiment_id, run_name=f"train-{model_name}", tags=tags)
    run_id = run.info.run_id
    try:
        from mlflow.entities import Param  # noqa: PLC0415

        client.log_batch(run_id, params=[Param(k, v) for k, v in config.logged_params().items()])
        logged = log_metrics(client, run_id, metric_entries(evaluation), batch=batch_logging)
        _log_dataset(client, run_id, evaluation_set, evaluation.dataset_digest)
        with tempfile.TemporaryDirectory(prefix="citynerve-train-") as tmp:
            sample = window_of(simulate_water(replace(base, seed=base.seed + 999)), model_baseline(base))
            model_dir = save_detector(
                detector, Path(tmp) / MODEL_ARTIFACT_PATH, dict(sample), metadata=tags
            )
            digest = artifact_digest(model_dir)
            report = Path(tmp) / "evaluation"
            report.mkdir()
            (report / "report.json").write_text(
                json.dumps(
                    {
                        "metrics": evaluation.metrics,
                        "scenarios": evaluation.per_scenario,
                        "dataset": evaluation_set.identity(),
                        "training": identity,
                    },
                    indent=2,
                    default=str,
                )
            )
            client.log_artifacts(run_id, str(model_dir), artifact_path=MODEL_ARTIFACT_PATH)
            client.log_artifacts(run_id, str(report), artifact_path="evaluation")
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    model = register_logged_artifact(
        tracking_uri,
        model_name,
        run_id,
        MODEL_ARTIFACT_PATH,
        digest,
        tags={**tags, DIGEST_TAG: digest},
        alias=alias,
    )
    return TrainingResult(
        model, run_id, dict(evaluation.metrics), evaluation.dataset_digest, logged, time.monotonic() - started
    )


def download_verified(tracking_uri: str, name: str, version: str, destination: Path) -> Path:
    """Download a version's artifact into ``destination``, checked against its registration record.

    This is the ML engineer's check that a version is what training registered (the
    ``citynerve.io/artifact-digest`` tag); cities never rely on that tag, they verify against
    the digest the hub's promotion recorded. Raises ``ModelResolutionError`` with reason
    ``ArtifactDigestMissing`` or ``ArtifactDigestMismatch``.
    """
    record = read_model_version(tracking_uri, name, version=version)
    if record.artifact_digest is None:
        raise ModelResolutionError(
            "ArtifactDigestMissing", f"version {version} of {name!r} has no {DIGEST_TAG} tag"
        )
    destination.mkdir(parents=True, exist_ok=True)
    resolve_model_version(
        tracking_uri,
        name,
        version=version,
        expected_digest=record.artifact_digest,
        trusted="the digest recorded at registration",
        destination=destination,
    )
    return destination / MODEL_ARTIFACT_PATH


def evaluate_registered(
    tracking_uri: str, name: str, version: str, config: WaterTrainingConfig | None = None
) -> tuple[str, Evaluation]:
    """Score a registered (verified) water-burst detector on ``config``'s evaluation set; logs a run.

    Returns the evaluation run's id and the evaluation.
    """
    config = config or WaterTrainingConfig()
    with tempfile.TemporaryDirectory(prefix="citynerve-evaluate-") as tmp:
        detector = load_detector(download_verified(tracking_uri, name, version, Path(tmp)))
    if not isinstance(detector, WaterLeakDetector):
        raise TypeError(
            f"version {version} of {name!r} is a {type(detector).__name__}, not a water-burst detector"
        )
    evaluation_set = config.evaluation_set()
    evaluation = evaluate_water_detector(detector, config.base(), evaluation_set)
    client = registry_client(tracking_uri)
    experiment_id = ensure_experiment(client, EXPERIMENT)
    run = client.create_run(
        experiment_id,
        run_name=f"evaluate-{name}-v{version}",
        tags={
            EVALUATION_DATASET_TAG: evaluation.dataset_digest,
            "citynerve.io/evaluated-model": f"models:/{name}/{version}",
            CODE_VERSION_TAG: code_version(),
        },
    )
    log_metrics(client, run.info.run_id, metric_entries(evaluation))
    _log_dataset(client, run.info.run_id, evaluation_set, evaluation.dataset_digest)
    client.set_terminated(run.info.run_id)
    return run.info.run_id, evaluation
