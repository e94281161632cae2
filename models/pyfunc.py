"""Detectors saved as MLflow models: an ``mlflow.pyfunc`` wrapper with a signature.

A saved detector is an MLflow pyfunc model whose input is a detector window as one wide table
(``timeSeconds`` and one column per ``<stream>/<sensor>``) and whose output is the detector's
score per time step (``timeSeconds``, ``score``). The signature is inferred from a sample
window, so MLflow checks the columns a caller sends. The fitted detector itself travels as a
pickle inside the model's artifacts; it is loaded only from an artifact whose digest was
verified (``citynerve.models.registry.resolve_model_version``).
"""

from __future__ import annotations

import pickle
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd  # type: ignore[import-untyped]  # no stubs in this environment
from citynerve.models.detectors.base import Detector, SensorWindow, Window
from citynerve.models.registry import ModelResolutionError, ResolvedModel, resolve_model_version

TIME_COLUMN = "timeSeconds"
SCORE_COLUMN = "score"
DETECTOR_ARTIFACT = "detector"
_SEPARATOR = "/"


def window_to_frame(window: Window) -> pd.DataFrame:
    """A window as one wide table; every stream must share the first stream's clock."""
    streams = list(window.items())
    if not streams:
        raise ValueError("an empty window has no clock to tabulate")
    times = streams[0][1].times_s
    columns: dict[str, Any] = {TIME_COLUMN: np.asarray(times, dtype=np.float64)}
    for stream, data in streams:
        if not np.array_equal(data.times_s, times):
            raise ValueError(f"stream {stream!r} is on a different clock from {streams[0][0]!r}")
        for i, sensor in enumerate(data.sensors):
            columns[f"{stream}{_SEPARATOR}{sensor}"] = np.asarray(data.values[:, i], dtype=np.float64)
    return pd.DataFrame(columns)


def frame_to_window(frame: pd.DataFrame) -> dict[str, SensorWindow]:
    """The inverse of ``window_to_frame`` (column order within a stream is kept)."""
    if TIME_COLUMN not in frame.columns:
        raise ValueError(f"the model input lacks the {TIME_COLUMN!r} column")
    times = frame[TIME_COLUMN].to_numpy(dtype=np.float64)
    by_stream: dict[str, list[str]] = {}
    for column in frame.columns:
        if column == TIME_COLUMN:
            continue
        stream, sep, sensor = str(column).partition(_SEPARATOR)
        if not sep:
            raise ValueError(f"model input column {column!r} is not <stream>{_SEPARATOR}<sensor>")
        by_stream.setdefault(stream, []).append(sensor)
    return {
        stream: SensorWindow(
            times,
            tuple(sensors),
            frame[[f"{stream}{_SEPARATOR}{s}" for s in sensors]].to_numpy(dtype=np.float64),
        )
        for stream, sensors in by_stream.items()
    }


def score_frame(detector: Detector, frame: pd.DataFrame) -> pd.DataFrame:
    """The detector's score per time step of a tabulated window."""
    scores = detector.score(frame_to_window(frame))
    return pd.DataFrame({TIME_COLUMN: frame[TIME_COLUMN].to_numpy(), SCORE_COLUMN: scores})


class DetectorModel(mlflow.pyfunc.PythonModel):  # type: ignore[misc]  # mlflow is untyped here
    """Any CityNerve detector as an MLflow pyfunc: window table in, score per time step out."""

    def __init__(self) -> None:
        self.detector: Detector | None = None

    def load_context(self, context: Any) -> None:
        path = Path(context.artifacts[DETECTOR_ARTIFACT])
        with path.open("rb") as fh:
            # the artifact's digest was verified against the registry before it got here
            self.detector = pickle.load(fh)  # noqa: S301

    def predict(
        self,
        context: Any,  # noqa: ARG002 - MLflow's signature; the detector was loaded in load_context
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,  # noqa: ARG002 - a detector takes no inference parameters
    ) -> Any:
        if self.detector is None:
            raise RuntimeError("the detector model was not loaded; load it with mlflow.pyfunc.load_model")
        return score_frame(self.detector, model_input)


def save_detector(
    detector: Detector, path: Path, sample: Window, metadata: dict[str, str] | None = None
) -> Path:
    """Save a fitted detector as an MLflow pyfunc model in ``path`` (which must not exist yet)."""
    from mlflow.models import infer_signature  # noqa: PLC0415

    frame = window_to_frame(sample)
    signature = infer_signature(frame, score_frame(detector, frame))
    with tempfile.TemporaryDirectory(prefix="citynerve-detector-") as tmp:
        pickled = Path(tmp) / "detector.pkl"
        with pickled.open("wb") as fh:
            pickle.dump(detector, fh, protocol=pickle.HIGHEST_PROTOCOL)
        mlflow.pyfunc.save_model(
            str(path),
            python_model=DetectorModel(),
            artifacts={DETECTOR_ARTIFACT: str(pickled)},
            signature=signature,
            input_example=frame.head(4),
            # the detector classes come with citynerve itself; naming it avoids a slow inference
            pip_requirements=["citynerve"],
            metadata=dict(metadata or {}),
        )
    return path


def load_detector(model_dir: Path) -> Detector:
    """The fitted detector inside a saved (and verified) pyfunc model directory."""
    model = mlflow.pyfunc.load_model(str(model_dir))
    wrapped = model.unwrap_python_model()
    if not isinstance(wrapped, DetectorModel) or wrapped.detector is None:
        raise ValueError(f"{model_dir} is not a CityNerve detector model")
    return wrapped.detector


@dataclass(frozen=True)
class VerifiedDetector:
    """A registered version loaded for scoring: what was resolved, the detector, how long it took."""

    resolved: ResolvedModel
    detector: Detector
    load_seconds: float


def load_verified_detector(
    tracking_uri: str, registered_model: str, version: str, expected_digest: str | None, trusted: str
) -> VerifiedDetector:
    """Download version ``version`` of ``registered_model``, check its artifact's sha256 against
    ``expected_digest`` (named ``trusted`` in a refusal), and only then ``mlflow.pyfunc.load_model`` it.

    A version without an expected digest is refused: a workload scores only verified artifacts.
    """
    if not expected_digest:
        raise ModelResolutionError(
            "ArtifactNotVerified",
            f"version {version} of {registered_model!r} has no recorded digest ({trusted}) to check its "
            "artifact against, so it is not loaded",
        )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="citynerve-load-") as tmp:
        resolved = resolve_model_version(
            tracking_uri, registered_model, version=version, expected_digest=expected_digest,
            trusted=trusted, destination=Path(tmp),
        )
        found = sorted(Path(tmp).rglob("MLmodel"))
        if not found:
            raise ModelResolutionError(
                "NotADetectorModel",
                f"version {version} of {registered_model!r} holds no MLflow model (no MLmodel file)",
            )
        try:
            detector = load_detector(found[0].parent)
        except ValueError as exc:
            raise ModelResolutionError("NotADetectorModel", str(exc)) from exc
    return VerifiedDetector(resolved, detector, time.monotonic() - started)
