"""Training, evaluation and registration against a real MLflow server (and local Ray)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from citynerve.models.registry import (
    DIGEST_TAG,
    SCENARIO_KIND_TAG,
    TRAINER_IDENTITY,
    ModelResolutionError,
    alias_version,
    read_model_version,
    registry_client,
    resolve_model_version,
    set_model_alias,
)
from citynerve.models.training import (
    CODE_VERSION_TAG,
    EVALUATION_DATASET_TAG,
    TRAINING_DATA_TAG,
    TrainingResult,
    download_verified,
    evaluate_registered,
    train_water_detector,
)
from citynerve.operators.localfed.mlflow_server import LocalMlflow

MODEL = "water-burst-detector"


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("mlflow")
    server = LocalMlflow(root)
    server.start()
    with pytest.MonkeyPatch.context() as env:  # MLflow's own variables: this process trains
        for key, value in server.identity(TRAINER_IDENTITY).env().items():
            env.setenv(key, value)
        try:
            yield server.url, root
        finally:
            server.stop()


@pytest.fixture(scope="module")
def trained(mlflow_url: tuple[str, Path], ray_local: None) -> TrainingResult:
    return train_water_detector(mlflow_url[0], MODEL)


@pytest.mark.timeout(240)
def test_training_logs_params_metrics_dataset_and_artifacts(
    trained: TrainingResult, mlflow_url: tuple[str, Path]
) -> None:
    assert trained.seconds < 60
    run = registry_client(mlflow_url[0]).get_run(trained.run_id)
    assert run.data.params["network"] == "Net3"
    for metric in ("detectionRate", "detectionDelaySeconds", "falseAlarmsPerDay", "localisationErrorMetres"):
        assert metric in run.data.metrics, metric
    assert 0.0 < run.data.metrics["detectionRate"] <= 1.0
    assert run.data.tags[EVALUATION_DATASET_TAG] == trained.dataset_digest
    inputs = run.inputs.dataset_inputs
    assert [i.dataset.source_type for i in inputs] == ["citynerve-simulation"]
    assert '"network": "Net3"' in inputs[0].dataset.source
    artifacts = {a.path for a in registry_client(mlflow_url[0]).list_artifacts(trained.run_id)}
    assert artifacts == {"model", "evaluation"}


@pytest.mark.timeout(120)
def test_the_version_is_registered_with_tags_digest_and_the_challenger_alias(
    trained: TrainingResult, mlflow_url: tuple[str, Path]
) -> None:
    url = mlflow_url[0]
    record = read_model_version(url, MODEL, version=trained.model.version)
    assert record.artifact_digest == trained.model.artifact_digest
    assert record.tags[SCENARIO_KIND_TAG] == "water-burst"
    assert record.tags[TRAINING_DATA_TAG].startswith("sha256:")
    assert record.tags[EVALUATION_DATASET_TAG] == trained.dataset_digest
    assert record.tags[CODE_VERSION_TAG].startswith("0.1.0")
    assert record.metrics["detectionRate"] == trained.metrics["detectionRate"]
    assert alias_version(url, MODEL, "challenger") == trained.model.version
    assert alias_version(url, MODEL, "champion") is None
    set_model_alias(url, MODEL, "champion", trained.model.version)
    resolved = resolve_model_version(
        url, MODEL, alias="champion", expected_digest=trained.model.artifact_digest
    )
    assert resolved.version == trained.model.version


@pytest.mark.timeout(180)
def test_evaluation_of_a_registered_version_and_refusal_of_a_tampered_one(
    trained: TrainingResult, mlflow_url: tuple[str, Path], tmp_path: Path
) -> None:
    url, root = mlflow_url
    run_id, evaluation = evaluate_registered(url, MODEL, trained.model.version)
    assert evaluation.metrics == pytest.approx(trained.metrics)  # same data set, same detector
    assert registry_client(url).get_run(run_id).data.tags[EVALUATION_DATASET_TAG] == trained.dataset_digest

    stored = next((root / "artifacts").rglob(f"{trained.run_id}/artifacts/model/MLmodel"))
    stored.write_text(stored.read_text() + "\n# changed after registration\n")
    with pytest.raises(ModelResolutionError) as refused:
        download_verified(url, MODEL, trained.model.version, tmp_path)
    assert refused.value.reason == "ArtifactDigestMismatch"
    with pytest.raises(ModelResolutionError, match="refused as untrusted"):
        resolve_model_version(
            url, MODEL, version=trained.model.version, expected_digest=trained.model.artifact_digest
        )
    # Without an expected digest nothing is verified: the registry's own tag is never the reference.
    unverified = resolve_model_version(url, MODEL, version=trained.model.version)
    assert not unverified.verified
    assert unverified.artifact_digest != trained.model.artifact_digest
    assert DIGEST_TAG in read_model_version(url, MODEL, version=trained.model.version).tags


def _stored_history(root: Path, days: int, seed: int) -> tuple[object, list[str]]:
    """``days`` continuous leak-free days of a Net3 zone as its fleets' workers store them: a
    pressure window per logger (terminal id = junction, kPa) and the zone's supply (m³/h) per 15 min."""
    from dataclasses import replace  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415
    from citynerve.models.detectors.water import KPA_PER_METRE_OF_WATER  # noqa: PLC0415
    from citynerve.workloads.dataplane.history import compact, day_of, window_rows, write_part  # noqa: PLC0415
    from citynerve.workloads.dataplane.windows import Window  # noqa: PLC0415
    from citynerve.workloads.sim.water import WaterScenarioSpec, choose_sensors, simulate_water  # noqa: PLC0415
    from citynerve.workloads.water import ZONE_SUPPLY_TERMINAL  # noqa: PLC0415

    base = WaterScenarioSpec(network="Net3", sensors=choose_sensors("Net3", 8), seed=seed)
    run = simulate_water(replace(base, duration_s=days * 86400))
    day0_ms = 1_764_979_200_000  # a UTC midnight
    seq = 0
    for i, t in enumerate(run.times_s[:-1]):
        start = day0_ms + int(t * 1000)
        present = ~np.isnan(run.pressure[i])
        sensors = np.asarray(run.layout.pressure_nodes, dtype=object)[present]
        kpa = run.pressure[i][present] * KPA_PER_METRE_OF_WATER
        ones = np.ones(len(kpa), dtype=np.int64)
        supply = np.array([float(run.consumption()[i]) * 3600.0])
        for window in (
            Window("c", "zone-pressure", "pressure", start, 900, sensors, ones, kpa, kpa, kpa),
            Window("c", "zone-supply", "flow", start, 900, np.array([ZONE_SUPPLY_TERMINAL], dtype=object),
                   np.ones(1, dtype=np.int64), supply, supply, supply),
        ):
            seq += 1
            write_part(root, window.fleet, day_of(start), [seq], window_rows(window))
    for fleet in ("zone-pressure", "zone-supply"):
        for d in range(days):
            compact(root, fleet, day_of(day0_ms + d * 86_400_000))
    return run, list(run.layout.pressure_nodes)


@pytest.mark.timeout(300)
def test_a_detector_trained_on_the_stored_window_history_is_registered_and_scores_live(
    mlflow_url: tuple[str, Path], ray_local: None, tmp_path: Path
) -> None:
    """The zone's fleets' history (Parquet by fleet and day) → the detector's window against the
    hydraulic model of the same days → a registered version whose loggers are the fleet's terminals
    and that carries the model it runs forward live."""
    from citynerve.models.pyfunc import load_verified_detector  # noqa: PLC0415
    from citynerve.models.training import WaterTrainingConfig  # noqa: PLC0415
    from citynerve.workloads.scoring import scorer_for  # noqa: PLC0415
    from citynerve.workloads.sim.water import WaterScenarioSpec  # noqa: PLC0415
    from citynerve.workloads.water import WaterHistory, history_window  # noqa: PLC0415

    _, loggers = _stored_history(tmp_path, days=3, seed=21)
    source = WaterHistory(tmp_path, "zone-pressure", "zone-supply")
    window, spec, identity = history_window(source, WaterScenarioSpec(network="Net3"))
    assert spec.sensors is not None
    assert spec.sensors.pressure_nodes == tuple(sorted(loggers))
    assert window["pressure"].sensors == tuple(sorted(loggers))
    assert len(window["pressure"].times_s) == 3 * 96
    assert identity["steps"] == 3 * 96
    assert identity["loggers"] == sorted(loggers)
    # kPa back to metres of head, against the model's expectation of the same days
    assert abs(float(window["pressure"].values[0, 0]) - float(window["pressure_model"].values[0, 0])) < 5.0

    config = WaterTrainingConfig(history=source, evaluation_leaks=2)
    result = train_water_detector(mlflow_url[0], "history-detector", config, alias=None)
    client = registry_client(mlflow_url[0])
    run = client.get_run(result.run_id)
    assert run.data.params["trainingData"] == "window-history"
    assert run.data.params["pressureFleet"] == "zone-pressure"
    assert "historyDays" not in run.data.params  # simulated days were not what it was fitted on
    assert run.data.tags[TRAINING_DATA_TAG].startswith("sha256:")
    loaded = load_verified_detector(mlflow_url[0], "history-detector", result.model.version,
                                    result.model.artifact_digest, "the registered digest")
    detector = loaded.detector
    assert detector.hydraulic_model.sensors.pressure_nodes == tuple(sorted(loggers))  # type: ignore[attr-defined]
    scorer = scorer_for("water-burst", detector)
    assert scorer.loggers == tuple(sorted(loggers))


@pytest.mark.timeout(30)
def test_training_from_history_names_what_is_missing(tmp_path: Path) -> None:
    from citynerve.workloads.sim.water import WaterScenarioSpec  # noqa: PLC0415
    from citynerve.workloads.water import WaterHistory, history_window  # noqa: PLC0415

    with pytest.raises(ValueError, match="no pressure windows of fleet zone-pressure"):
        history_window(WaterHistory(tmp_path, "zone-pressure", "zone-supply"), WaterScenarioSpec())
