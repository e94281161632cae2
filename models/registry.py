"""The MLflow model registry as CityNerve uses it: registration with a recorded artifact digest,
and resolution that verifies it.

A model version's *artifact digest* is sha256 over its files: one line per file, sorted by
path, ``<sha256 of the file>  <path relative to the artifact root>``, and the digest of those
lines (the same shape as ``sha256sum`` output, so a person can recompute it). It is recorded
as the model-version tag ``citynerve.io/artifact-digest`` when the version is registered, and
recomputed from the downloaded artifact every time the version is resolved: an artifact that
changed since registration is refused with reason ``ArtifactDigestMismatch``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DIGEST_TAG = "citynerve.io/artifact-digest"
SCENARIO_KIND_TAG = "citynerve.io/scenario-kind"  # added for promotion: the kind a version detects for
EXPERIMENT = "citynerve-model-registrations"
_CHUNK = 1 << 20


class ModelResolutionError(Exception):
    """A model could not be resolved or is not trusted; ``reason`` is a CamelCase word for a condition.

    ``permanent`` is False when trying again later may succeed (the registry was unreachable).
    """

    def __init__(self, reason: str, message: str, *, permanent: bool = True) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.permanent = permanent


@dataclass(frozen=True)
class ResolvedModel:
    """A registered model version, resolved and verified."""

    name: str
    version: str
    model_uri: str
    artifact_digest: str
    run_id: str | None
    metrics: Mapping[str, float] = field(default_factory=dict)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def artifact_digest(root: Path) -> str:
    """``sha256:<hex>`` over every file under ``root`` (a file alone is its own root)."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    base = root.parent if root.is_file() else root
    lines = "".join(f"{_file_sha256(p)}  {p.relative_to(base).as_posix()}\n" for p in files)
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


def _quiet_client_settings() -> None:
    # The MLflow client retries a refused connection for minutes by default; an operator
    # would rather report the registry unreachable at once and try again on its next pass.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _client(tracking_uri: str) -> Any:
    _quiet_client_settings()
    from mlflow import MlflowClient  # noqa: PLC0415 - mlflow is heavy; import it when first used

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def register_model_version(
    tracking_uri: str,
    name: str,
    artifact_dir: Path,
    metrics: Mapping[str, float] | None = None,
    alias: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> ResolvedModel:
    """Log ``artifact_dir`` in a new run with ``metrics``, register it as a new version of ``name``
    with its artifact digest recorded, and point ``alias`` at it when given."""
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    client = _client(tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
    run = client.create_run(experiment_id, run_name=f"register-{name}")
    run_id = run.info.run_id
    for key, value in (metrics or {}).items():
        client.log_metric(run_id, key, float(value))
    client.log_artifacts(run_id, str(artifact_dir), artifact_path="model")
    client.set_terminated(run_id)
    digest = artifact_digest(artifact_dir)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/model",
        run_id=run_id,
        tags={DIGEST_TAG: digest, **(tags or {})},
    )
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return ResolvedModel(
        name, str(version.version), f"models:/{name}/{version.version}", digest, run_id, dict(metrics or {})
    )


def _registry_call(what: str, call: Any, *args: Any) -> Any:
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    try:
        return call(*args)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            raise
        raise ModelResolutionError(
            "RegistryError", f"the MLflow registry refused {what}: {exc}", permanent=False
        ) from exc
    except OSError as exc:
        raise ModelResolutionError(
            "RegistryUnreachable", f"the MLflow registry did not answer {what}: {exc}", permanent=False
        ) from exc


def resolve_model_version(
    tracking_uri: str,
    name: str,
    *,
    alias: str | None = None,
    version: str | None = None,
    expected_digest: str | None = None,
) -> ResolvedModel:
    """Resolve ``name`` at ``alias`` or ``version``, download its artifact and verify its digest.

    Raises ``ModelResolutionError`` with reason ``RegisteredModelNotFound``, ``AliasNotFound``,
    ``VersionNotFound``, ``ArtifactDigestMissing``, ``ArtifactDigestMismatch`` or (temporary)
    ``RegistryUnreachable``.
    """
    import requests  # noqa: PLC0415 - MLflow's transport; its errors mean the registry is unreachable
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    if (alias is None) == (version is None):
        raise ModelResolutionError("InvalidReference", "set exactly one of alias and version")
    client = _client(tracking_uri)
    try:
        try:
            _registry_call(f"registered model {name!r}", client.get_registered_model, name)
        except MlflowException as exc:
            raise ModelResolutionError(
                "RegisteredModelNotFound",
                f"registered model {name!r} does not exist in the MLflow registry at {tracking_uri}; "
                "register it or correct spec.registeredModel",
            ) from exc
        try:
            if alias is not None:
                found = _registry_call(
                    f"alias {alias!r} of {name!r}", client.get_model_version_by_alias, name, alias
                )
            else:
                found = _registry_call(
                    f"version {version} of {name!r}", client.get_model_version, name, version
                )
        except MlflowException as exc:
            if alias is not None:
                raise ModelResolutionError(
                    "AliasNotFound",
                    f"registered model {name!r} has no alias {alias!r}; set the alias in "
                    "MLflow (or promote a version to it) or correct spec.alias",
                ) from exc
            raise ModelResolutionError(
                "VersionNotFound", f"registered model {name!r} has no version {version}; correct spec.version"
            ) from exc
        resolved_version = str(found.version)
        recorded = (found.tags or {}).get(DIGEST_TAG)
        if recorded is None and expected_digest is None:
            raise ModelResolutionError(
                "ArtifactDigestMissing",
                f"version {resolved_version} of {name!r} has no {DIGEST_TAG} tag, so its artifact cannot be "
                "verified; register it with citynerve.models.registry or set spec.expectedDigest",
            )
        with tempfile.TemporaryDirectory(prefix="citynerve-model-") as tmp:
            from mlflow.artifacts import download_artifacts  # noqa: PLC0415

            try:
                local = download_artifacts(artifact_uri=found.source, dst_path=tmp, tracking_uri=tracking_uri)
            except MlflowException as exc:
                raise ModelResolutionError(
                    "ArtifactUnavailable",
                    f"the artifact of version {resolved_version} of {name!r} "
                    f"({found.source}) could not be downloaded: {exc}",
                    permanent=False,
                ) from exc
            digest = artifact_digest(Path(local))
        for what, wanted in (
            ("the digest recorded at registration", recorded),
            ("spec.expectedDigest", expected_digest),
        ):
            if wanted is not None and wanted != digest:
                raise ModelResolutionError(
                    "ArtifactDigestMismatch",
                    f"the artifact of version {resolved_version} of {name!r} has digest {digest}, not "
                    f"{what} ({wanted}); it was changed after registration and is refused as untrusted",
                )
        metrics: dict[str, float] = {}
        if found.run_id:
            run = _registry_call(f"run {found.run_id}", client.get_run, found.run_id)
            metrics = {k: float(v) for k, v in run.data.metrics.items()}
    except requests.exceptions.RequestException as exc:
        raise ModelResolutionError(
            "RegistryUnreachable",
            f"the MLflow registry at {tracking_uri} did not answer: {exc}",
            permanent=False,
        ) from exc
    return ResolvedModel(
        name, resolved_version, f"models:/{name}/{resolved_version}", digest, found.run_id, metrics
    )


# --- Additions for training and governed promotion (models engineer) ----------------------------
# Additive only: registering an artifact already logged in a training run, reading a version's
# record (digest tag, source-run metrics, tags) without downloading its artifact, and aliases.


def register_logged_artifact(
    tracking_uri: str,
    name: str,
    run_id: str,
    artifact_path: str,
    digest: str,
    tags: Mapping[str, str] | None = None,
    alias: str | None = None,
) -> ResolvedModel:
    """Register ``artifact_path`` of run ``run_id`` (already logged) as a new version of ``name``.

    ``digest`` is ``artifact_digest`` of the directory that was logged; it is recorded as the
    version's ``citynerve.io/artifact-digest`` tag, so resolution can verify the artifact.
    """
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    client = _client(tracking_uri)
    run = client.get_run(run_id)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/{artifact_path}",
        run_id=run_id,
        tags={DIGEST_TAG: digest, **(tags or {})},
    )
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    metrics = {k: float(v) for k, v in run.data.metrics.items()}
    return ResolvedModel(
        name, str(version.version), f"models:/{name}/{version.version}", digest, run_id, metrics
    )


@dataclass(frozen=True)
class ModelVersionRecord:
    """What the registry records about a version: its digest tag, its run's metrics, its tags."""

    name: str
    version: str
    artifact_digest: str | None
    run_id: str | None
    metrics: Mapping[str, float] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)


def read_model_version(
    tracking_uri: str, name: str, *, version: str | None = None, alias: str | None = None
) -> ModelVersionRecord:
    """The record of ``name`` at ``version`` or ``alias``, without downloading its artifact.

    Raises ``ModelResolutionError`` (``RegisteredModelNotFound``, ``AliasNotFound``,
    ``VersionNotFound``; ``RegistryUnreachable`` as temporary).
    """
    import requests  # noqa: PLC0415
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    if (alias is None) == (version is None):
        raise ModelResolutionError("InvalidReference", "set exactly one of alias and version")
    client = _client(tracking_uri)
    try:
        try:
            if alias is not None:
                found = _registry_call(
                    f"alias {alias!r} of {name!r}", client.get_model_version_by_alias, name, alias
                )
            else:
                found = _registry_call(
                    f"version {version} of {name!r}", client.get_model_version, name, version
                )
        except MlflowException as exc:
            reason, what = (
                ("AliasNotFound", f"alias {alias!r}") if alias else ("VersionNotFound", f"version {version}")
            )
            raise ModelResolutionError(
                reason, f"registered model {name!r} has no {what} in the MLflow registry at {tracking_uri}"
            ) from exc
        metrics: dict[str, float] = {}
        if found.run_id:
            run = _registry_call(f"run {found.run_id}", client.get_run, found.run_id)
            metrics = {k: float(v) for k, v in run.data.metrics.items()}
    except requests.exceptions.RequestException as exc:
        raise ModelResolutionError(
            "RegistryUnreachable",
            f"the MLflow registry at {tracking_uri} did not answer: {exc}",
            permanent=False,
        ) from exc
    tags = dict(found.tags or {})
    return ModelVersionRecord(name, str(found.version), tags.get(DIGEST_TAG), found.run_id, metrics, tags)


def alias_version(tracking_uri: str, name: str, alias: str) -> str | None:
    """The version ``alias`` of ``name`` names, or None when the alias (or the model) does not exist."""
    try:
        return read_model_version(tracking_uri, name, alias=alias).version
    except ModelResolutionError as exc:
        if exc.permanent:
            return None
        raise


def set_model_alias(tracking_uri: str, name: str, alias: str, version: str) -> None:
    """Point ``alias`` of ``name`` at ``version`` (``champion``/``challenger``; stages are not used)."""
    import requests  # noqa: PLC0415

    client = _client(tracking_uri)
    try:
        _registry_call(
            f"moving alias {alias!r} of {name!r}", client.set_registered_model_alias, name, alias, version
        )
    except requests.exceptions.RequestException as exc:
        raise ModelResolutionError(
            "RegistryUnreachable",
            f"the MLflow registry at {tracking_uri} did not answer: {exc}",
            permanent=False,
        ) from exc


def registry_client(tracking_uri: str) -> Any:
    """An MLflow client for ``tracking_uri`` that fails fast when the server does not answer."""
    return _client(tracking_uri)
