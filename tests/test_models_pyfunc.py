"""Detectors as MLflow pyfunc models: window tables, signature, save and load (no server needed)."""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pytest
from citynerve.models.detectors.base import SensorWindow
from citynerve.models.detectors.water import WaterLeakDetector
from citynerve.models.pyfunc import (
    SCORE_COLUMN,
    TIME_COLUMN,
    frame_to_window,
    load_detector,
    save_detector,
    window_to_frame,
)
from citynerve.models.registry import artifact_digest

STEP = 900.0


def synthetic_window(days: int, seed: int) -> dict[str, SensorWindow]:
    rng = np.random.default_rng(seed)
    times = np.arange(0, days * 86400, STEP)
    sensors = ("J1", "J2", "J3")
    model = 40 + 5 * np.sin(2 * np.pi * times / 86400)[:, None] + np.zeros((1, len(sensors)))
    field = model + 0.3 + rng.normal(0, 0.05, model.shape)
    return {
        "pressure": SensorWindow(times, sensors, field),
        "pressure_model": SensorWindow(times, sensors, model),
    }


@pytest.mark.timeout(30)
def test_window_and_table_round_trip() -> None:
    window = synthetic_window(1, 0)
    frame = window_to_frame(window)
    assert list(frame.columns[:3]) == [TIME_COLUMN, "pressure/J1", "pressure/J2"]
    back = frame_to_window(frame)
    assert back.keys() == window.keys()
    np.testing.assert_array_equal(back["pressure"].values, window["pressure"].values)
    assert back["pressure_model"].sensors == ("J1", "J2", "J3")
    with pytest.raises(ValueError, match="different clock"):
        window_to_frame(
            {**window, "other": SensorWindow(window["pressure"].times_s[:-1], ("x",), np.zeros((95, 1)))}
        )


@pytest.mark.timeout(60)
def test_a_saved_detector_scores_like_the_original_and_has_a_signature(tmp_path: Path) -> None:
    detector = WaterLeakDetector(step_s=STEP).fit(synthetic_window(3, 1))
    window = synthetic_window(1, 2)
    path = save_detector(
        detector, tmp_path / "model", window, metadata={"citynerve.io/scenario-kind": "water-burst"}
    )
    assert (path / "MLmodel").exists()
    assert artifact_digest(path).startswith("sha256:")

    loaded = mlflow.pyfunc.load_model(str(path))
    inputs = loaded.metadata.get_input_schema().input_names()
    assert inputs[0] == TIME_COLUMN
    assert "pressure_model/J3" in inputs
    assert loaded.metadata.get_output_schema().input_names() == [TIME_COLUMN, SCORE_COLUMN]
    assert loaded.metadata.metadata["citynerve.io/scenario-kind"] == "water-burst"
    scores = loaded.predict(window_to_frame(window))
    np.testing.assert_allclose(scores[SCORE_COLUMN].to_numpy(), detector.score(window))
    assert isinstance(load_detector(path), WaterLeakDetector)
