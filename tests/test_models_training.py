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
