"""The MLflow model registry as CityNerve uses it: registration with a recorded artifact digest,
and resolution that verifies a downloaded artifact against a digest the caller trusts.

A model version's *artifact digest* is sha256 over its files: one line per file, sorted by
path, ``<sha256 of the file>  <path relative to the artifact root>``, and the digest of those
lines (the same shape as ``sha256sum`` output, so a person can recompute it).

Where the expected digest comes from is the caller's decision, never this module's:

- Registration records the digest as the model-version tag ``citynerve.io/artifact-digest``.
  The tag is the trainer's record of what it logged; anyone who can write to the registry can
  change it together with the artifact, so nothing trusts it on its own. The hub reads it once,
  at a promotion's gate, only to refuse an artifact that changed since registration.
- The hub computes the digest of the artifact itself at the gate and records it in the
  ModelPromotion's status; the AnalyticsModel it pins in each city carries it as
  ``spec.expectedDigest``. A city verifies against that and nothing else
  (``resolve_model_version(..., expected_digest=...)``); see docs/models-trust.md.

A version whose artifact lies outside the registry's artifact root (``ARTIFACT_ROOT``: the
artifacts the tracking server serves) is refused with reason ``ArtifactOutsideRoot`` before
anything is downloaded.

Credentials are MLflow's own: ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (or
``~/.mlflow/credentials``) of the process. A refused identity is reported with reason
``RegistryUnauthenticated`` or ``RegistryPermissionDenied``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DIGEST_TAG = "citynerve.io/artifact-digest"
SCENARIO_KIND_TAG = "citynerve.io/scenario-kind"  # added for promotion: the kind a version detects for
EXPERIMENT = "citynerve-model-registrations"
# Every artifact CityNerve registers is logged through the tracking server, which serves it under
# this scheme (`mlflow server --serve-artifacts`, as the hub chart and the local server run it).
ARTIFACT_ROOT = "mlflow-artifacts:/"
# Errors that refuse an artifact as untrusted: a city keeps running the version it last verified.
REFUSED_ARTIFACT_REASONS = frozenset({"ArtifactDigestMismatch", "ArtifactOutsideRoot"})
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
    """A registered model version, resolved, with the digest computed from its downloaded artifact.

    ``verified`` is True when that digest was compared with an expected digest and matched.
    """

    name: str
    version: str
    model_uri: str
    artifact_digest: str
    run_id: str | None
    metrics: Mapping[str, float] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    verified: bool = False


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


def artifact_source_problem(source: str | None, root: str = ARTIFACT_ROOT) -> str | None:
    """Why a model version's artifact ``source`` is not a path under ``root``; None when it is (pure).

    Checked on the percent-decoded URI, so ``%2e%2e`` is a ``..`` too; ``mlflow-artifacts://host/…``
    (another server) and any other scheme (``file:``, ``s3:``, ``models:``, ``runs:``) are outside.
    """
    if not source:
        return "it has no artifact source"
    decoded = urllib.parse.unquote(source)
    prefix = root if root.endswith("/") else root + "/"
    if not decoded.startswith(prefix) or decoded.startswith(prefix + "/"):
        return f"its artifact source {source!r} is not under the registry's artifact root {prefix}"
    segments = decoded[len(prefix):].replace("\\", "/").split("/")
    if any(s in (".", "..") for s in segments):
        return f"its artifact source {source!r} contains a relative path segment ('.' or '..')"
    if not any(segments):
        return f"its artifact source {source!r} names the artifact root itself"
    return None


def digest_refusal(
    name: str, version: str, found: str, expected: str | None, trusted: str
) -> ModelResolutionError | None:
    """The refusal of version ``version`` of ``name`` whose artifact has digest ``found`` when
    ``expected`` (named by ``trusted``, e.g. ``spec.expectedDigest``) differs; None otherwise (pure)."""
    if expected is None or found == expected:
        return None
    return ModelResolutionError(
        "ArtifactDigestMismatch",
        f"the artifact of version {version} of {name!r} has digest {found}, not {trusted} ({expected}); "
        "it changed since that digest was recorded and is refused as untrusted",
    )


def _quiet_client_settings() -> None:
    # The MLflow client retries a refused connection for minutes by default; an operator
    # would rather report the registry unreachable at once and try again on its next pass.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _client(tracking_uri: str) -> Any:
    _quiet_client_settings()
    from mlflow import MlflowClient  # noqa: PLC0415 - mlflow is heavy; import it when first used

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def ensure_experiment(client: Any, name: str) -> str:
    """The id of experiment ``name``, created (and so owned by this process's identity) if missing;
    two processes creating it at once both get the one that exists."""
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    try:
        return str(client.create_experiment(name))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return str(client.get_experiment_by_name(name).experiment_id)


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
    run = client.create_run(ensure_experiment(client, EXPERIMENT), run_name=f"register-{name}")
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


_AUTH_ERRORS = {
    "UNAUTHENTICATED": (
        "RegistryUnauthenticated",
        "did not accept this process's credentials; set MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD (from the identity's Secret)",
    ),
    "PERMISSION_DENIED": (
        "RegistryPermissionDenied",
        "denied it to this process's MLflow identity; use an identity allowed to do it "
        "(docs/models-trust.md)",
    ),
}


def _registry_call(what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
    import requests  # noqa: PLC0415 - MLflow's transport
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    try:
        return call(*args, **kwargs)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            raise
        if isinstance(exc.__context__, requests.exceptions.RequestException):  # wrapped by MLflow's client
            raise ModelResolutionError(
                "RegistryUnreachable",
                f"the MLflow registry did not answer {what}: {exc.__context__}",
                permanent=False,
            ) from exc
        if exc.error_code in _AUTH_ERRORS:
            reason, why = _AUTH_ERRORS[exc.error_code]
            message = f"the MLflow registry {why} ({what})"
            raise ModelResolutionError(reason, message, permanent=False) from exc
        raise ModelResolutionError(
            "RegistryError", f"the MLflow registry refused {what}: {exc}", permanent=False
        ) from exc
    except OSError as exc:
        raise ModelResolutionError(
            "RegistryUnreachable", f"the MLflow registry did not answer {what}: {exc}", permanent=False
        ) from exc


def _download(found: Any, name: str, tracking_uri: str, destination: Path, artifact_root: str) -> Path:
    """Download version ``found``'s artifact into ``destination`` once its source is under the root."""
    from mlflow.artifacts import download_artifacts  # noqa: PLC0415
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    problem = artifact_source_problem(found.source, artifact_root)
    if problem is not None:
        raise ModelResolutionError(
            "ArtifactOutsideRoot",
            f"version {found.version} of {name!r} is refused: {problem}; register the artifact through "
            "the tracking server (citynerve models train)",
        )
    try:
        return Path(
            _registry_call(
                f"the artifact of version {found.version} of {name!r}",
                download_artifacts,
                artifact_uri=found.source,
                dst_path=str(destination),
                tracking_uri=tracking_uri,
            )
        )
    except MlflowException as exc:
        raise ModelResolutionError(
            "ArtifactUnavailable",
            f"the artifact of version {found.version} of {name!r} ({found.source}) could not be "
            f"downloaded: {exc}",
            permanent=False,
        ) from exc


def resolve_model_version(
    tracking_uri: str,
    name: str,
    *,
    alias: str | None = None,
    version: str | None = None,
    expected_digest: str | None = None,
    trusted: str = "spec.expectedDigest",
    destination: Path | None = None,
    artifact_root: str = ARTIFACT_ROOT,
) -> ResolvedModel:
    """Resolve ``name`` at ``alias`` or ``version``, download its artifact and compute its digest.

    With ``expected_digest`` (named ``trusted`` in the refusal), an artifact with another digest is
    refused and the result is ``verified``; without, the digest is only computed — the registry's
    own tag is never taken as the expected digest. The artifact is kept in ``destination`` when
    given, otherwise deleted.

    Raises ``ModelResolutionError`` with reason ``RegisteredModelNotFound``, ``AliasNotFound``,
    ``VersionNotFound``, ``ArtifactOutsideRoot``, ``ArtifactDigestMismatch`` or (temporary)
    ``RegistryUnreachable``, ``RegistryUnauthenticated``, ``RegistryPermissionDenied``,
    ``ArtifactUnavailable``.
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
        if destination is not None:
            digest = artifact_digest(_download(found, name, tracking_uri, destination, artifact_root))
        else:
            with tempfile.TemporaryDirectory(prefix="citynerve-model-") as tmp:
                digest = artifact_digest(_download(found, name, tracking_uri, Path(tmp), artifact_root))
        refusal = digest_refusal(name, resolved_version, digest, expected_digest, trusted)
        if refusal is not None:
            raise refusal
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
        name,
        resolved_version,
        f"models:/{name}/{resolved_version}",
        digest,
        found.run_id,
        metrics,
        dict(found.tags or {}),
        verified=expected_digest is not None,
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


# --- identities -----------------------------------------------------------------------------------
# The registry's identities (docs/models-trust.md). The admin is the hub operator's; trainers create
# and own their experiments and models; cities only read (the server's default permission is READ).
HUB_IDENTITY = "citynerve-hub"
TRAINER_IDENTITY = "citynerve-trainer"
CITY_IDENTITY = "citynerve-city"
_USERS_API = "/api/2.0/mlflow/users"


def ensure_users(
    tracking_uri: str, users: Mapping[str, str], admin: tuple[str, str] | None = None
) -> list[str]:
    """Create each of ``users`` (name → password) in the auth app of the server at ``tracking_uri``,
    or set the password of one that exists; returns the names in order. Passwords are never logged.

    Needs an admin identity: ``admin`` (name, password), else the process's MLflow credentials.
    Raises ``ModelResolutionError`` (temporary) when the server does not answer or refuses.
    """
    import requests  # noqa: PLC0415
    from mlflow.exceptions import MlflowException  # noqa: PLC0415
    from mlflow.utils.credentials import get_default_host_creds  # noqa: PLC0415
    from mlflow.utils.rest_utils import MlflowHostCreds, http_request, verify_rest_response  # noqa: PLC0415

    _quiet_client_settings()
    creds = (
        MlflowHostCreds(tracking_uri, username=admin[0], password=admin[1])
        if admin
        else get_default_host_creds(tracking_uri)
    )

    def call(method: str, path: str, **kwargs: Any) -> Any:
        endpoint = f"{_USERS_API}/{path}"
        return verify_rest_response(http_request(creds, endpoint, method, **kwargs), endpoint)

    done = []
    try:
        for name, password in users.items():
            body = {"username": name, "password": password}
            try:
                _registry_call(f"looking up user {name!r}", call, "GET", "get", params={"username": name})
            except MlflowException:  # no such user
                _registry_call(f"creating user {name!r}", call, "POST", "create", json=body)
            else:
                what = f"setting the password of {name!r}"
                _registry_call(what, call, "PATCH", "update-password", json=body)
            done.append(name)
    except requests.exceptions.RequestException as exc:
        raise ModelResolutionError(
            "RegistryUnreachable",
            f"the MLflow registry at {tracking_uri} did not answer: {exc}",
            permanent=False,
        ) from exc
    return done


def registry_client(tracking_uri: str) -> Any:
    """An MLflow client for ``tracking_uri`` that fails fast when the server does not answer."""
    return _client(tracking_uri)
