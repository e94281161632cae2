"""Trusted models, the pure decisions: where the expected digest comes from, and which artifacts
are refused before anything is downloaded (docs/models-trust.md)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from citynerve.models.registry import (
    DIGEST_TAG,
    ModelResolutionError,
    ResolvedModel,
    artifact_source_problem,
    digest_refusal,
)
from citynerve.operators.city.status import compute_model_status, missing_references
from citynerve.operators.conditions import find_condition
from citynerve.operators.hub.promotion import (
    chain_digests,
    expected_at_gate,
    gate_refusal,
    promotion_pins,
    read_identities,
    registry_view,
)

pytestmark = pytest.mark.timeout(10)
MODEL = "water-burst-detector"
GATED, SWAPPED, OLD = "sha256:" + "a" * 64, "sha256:" + "f" * 64, "sha256:" + "b" * 64
NOW = dt.datetime(2026, 11, 25, 4, 0, tzinfo=dt.UTC)


def resolved(version: str, digest: str, tag: str | None, *, verified: bool = False) -> ResolvedModel:
    tags = {DIGEST_TAG: tag} if tag else {}
    return ResolvedModel(MODEL, version, f"models:/{MODEL}/{version}", digest, "run-1", {"f1": 0.9}, tags,
                         verified)


def promoted(name: str, version: str, digest: str, created: str, model: str = MODEL) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "citynerve", "creationTimestamp": created},
        "spec": {"modelName": model, "source": {"version": version}},
        "status": {"resolvedVersion": version, "artifactDigest": digest,
                   "cities": [{"city": "shanghai", "promoted": "True", "reason": "Promoted"}]},
    }


# --- artifact URIs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "mlflow-artifacts:/1/0a1b/artifacts/model",
        "mlflow-artifacts:/12/run/artifacts/model/sub%20dir",
    ],
)
def test_an_artifact_served_by_the_registry_is_under_its_root(source: str) -> None:
    assert artifact_source_problem(source) is None


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("file:///etc", "not under the registry's artifact root"),
        ("s3://another-bucket/model", "not under the registry's artifact root"),
        ("models:/water-burst-detector/1", "not under the registry's artifact root"),
        ("runs:/0a1b/model", "not under the registry's artifact root"),
        ("mlflow-artifacts://elsewhere.example.org/1/run/artifacts/model", "not under"),
        ("mlflow-artifacts:/1/run/artifacts/../../../../etc", "relative path segment"),
        ("mlflow-artifacts:/1/run/artifacts/%2e%2e/%2E%2E/secrets", "relative path segment"),
        ("mlflow-artifacts:/1/run/./artifacts", "relative path segment"),
        ("mlflow-artifacts:/", "names the artifact root itself"),
        ("", "no artifact source"),
        (None, "no artifact source"),
    ],
)
def test_an_artifact_outside_the_root_is_refused_with_the_reason(source: str | None, why: str) -> None:
    problem = artifact_source_problem(source)
    assert problem is not None
    assert why in problem


def test_the_root_is_configurable_and_a_sibling_prefix_is_not_inside_it() -> None:
    assert artifact_source_problem("s3://citynerve-models/1/run/model", "s3://citynerve-models") is None
    assert artifact_source_problem("s3://citynerve-models-evil/1/model", "s3://citynerve-models") is not None


# --- the digest a city checks ---------------------------------------------------------------------


def test_a_digest_differing_from_the_chains_is_refused_naming_both() -> None:
    refusal = digest_refusal(MODEL, "2", SWAPPED, GATED, "spec.expectedDigest")
    assert isinstance(refusal, ModelResolutionError)
    assert refusal.reason == "ArtifactDigestMismatch"
    assert refusal.permanent
    assert SWAPPED in refusal.message
    assert f"not spec.expectedDigest ({GATED})" in refusal.message
    assert digest_refusal(MODEL, "2", GATED, GATED, "spec.expectedDigest") is None
    assert digest_refusal(MODEL, "2", GATED, None, "spec.expectedDigest") is None  # nothing to verify against


def test_the_pin_carries_the_digest_the_promotion_recorded_in_its_status() -> None:
    pins = promotion_pins(promoted("promote-v2", "2", GATED, "2026-11-25T04:00:00Z"))
    assert pins["shanghai"]["spec"] == {"registeredModel": MODEL, "version": "2", "expectedDigest": GATED}


def test_the_chain_keeps_the_newest_promotions_digest_per_version_of_this_model() -> None:
    chain = chain_digests(
        MODEL,
        [
            promoted("later", "2", GATED, "2026-11-25T05:00:00Z"),
            promoted("earlier", "2", OLD, "2026-11-25T04:00:00Z"),
            promoted("first", "1", OLD, "2026-11-24T04:00:00Z"),
            promoted("other-model", "3", SWAPPED, "2026-11-25T06:00:00Z", model="crowd-detector"),
            {"metadata": {"name": "not-started", "namespace": "citynerve"}, "spec": {"modelName": MODEL}},
        ],
    )
    assert chain == {
        "2": (GATED, "ModelPromotion citynerve/later"),
        "1": (OLD, "ModelPromotion citynerve/first"),
    }


def test_at_the_gate_a_chain_record_outranks_a_swapped_registry_tag() -> None:
    chain = {"2": (GATED, "ModelPromotion citynerve/promote-v2")}
    # a registry writer replaced the artifact of version 2 and set its tag to the new digest
    swapped = resolved("2", SWAPPED, SWAPPED)
    expected = (GATED, "the digest ModelPromotion citynerve/promote-v2 recorded")
    assert expected_at_gate(swapped, chain) == expected
    refusal = gate_refusal(swapped, chain)
    assert refusal is not None
    assert refusal[0] == "ArtifactDigestMismatch"
    assert "ModelPromotion citynerve/promote-v2" in refusal[1]
    view = registry_view(swapped, None, chain)
    assert (view.error_reason, view.digest) == ("ArtifactDigestMismatch", None)


def test_first_time_through_the_chain_the_hub_records_its_own_digest() -> None:
    view = registry_view(resolved("3", GATED, GATED), resolved("2", OLD, OLD), {})
    assert (view.version, view.digest, view.previous_version, view.previous_digest) == ("3", GATED, "2", OLD)
    changed = registry_view(resolved("3", SWAPPED, GATED), None, {})  # changed since registration
    assert changed.error_reason == "ArtifactDigestMismatch"
    assert "not the digest recorded at registration" in (changed.error_message or "")
    untagged = registry_view(resolved("3", GATED, None), None, {})
    assert untagged.error_reason == "ArtifactDigestMissing"


def test_a_previous_version_whose_artifact_changed_is_not_pinned_back_to() -> None:
    chain = {"2": (OLD, "ModelPromotion citynerve/promote-v2")}
    view = registry_view(resolved("3", GATED, GATED), resolved("2", SWAPPED, SWAPPED), chain)
    assert view.error_reason is None
    assert (view.previous_version, view.previous_digest) == (None, None)


# --- the city's side ----------------------------------------------------------------------------


def model(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "burst-detector", "generation": 1},
        "spec": {"registeredModel": MODEL, "version": "2", **spec},
        "status": status,
    }


def status_of(spec_digest: str | None, resolution: ResolvedModel) -> dict[str, Any]:
    spec = {"expectedDigest": spec_digest} if spec_digest else {}
    return compute_model_status(model(**spec), resolution, None, NOW)


def scenario(mode: str) -> dict[str, Any]:
    return {
        "metadata": {"name": "burst", "namespace": "city", "generation": 1},
        "spec": {
            "mode": mode,
            "fleets": [{"name": "pudong-pressure"}],
            "models": [{"name": "burst-detector"}],
        },
    }


def test_only_a_digest_from_the_spec_makes_a_model_verified() -> None:
    verified = status_of(GATED, resolved("2", GATED, GATED, verified=True))
    assert find_condition(verified, "Verified")["reason"] == "DigestMatched"  # type: ignore[index]
    # a matching registry tag alone verifies nothing
    unpinned = status_of(None, resolved("2", GATED, GATED))
    ready, checked = find_condition(unpinned, "Ready"), find_condition(unpinned, "Verified")
    assert ready is not None
    assert checked is not None
    assert ready["status"] == "True"
    assert (checked["status"], checked["reason"]) == ("False", "NoExpectedDigest")
    assert "live scenarios refuse this model" in checked["message"]


def test_a_live_scenario_refuses_an_unverified_model_and_a_drill_runs_it() -> None:
    fleets = {"pudong-pressure": {}}
    unpinned = {"burst-detector": model(status_of(None, resolved("2", GATED, GATED)))}
    unmet = missing_references(scenario("live"), fleets, unpinned)
    assert unmet is not None
    assert unmet[0] == "ModelNotVerified"
    assert "NoExpectedDigest" in unmet[1]
    assert missing_references(scenario("drill"), fleets, unpinned) is None
    status = status_of(GATED, resolved("2", GATED, None, verified=True))
    assert missing_references(scenario("live"), fleets, {"burst-detector": model(status)}) is None


@pytest.mark.parametrize("reason", ["ArtifactDigestMismatch", "ArtifactOutsideRoot"])
def test_a_refused_artifact_keeps_the_verified_version_and_its_verification(reason: str) -> None:
    before = status_of(GATED, resolved("2", GATED, None, verified=True))
    refused = ModelResolutionError(reason, "refused as untrusted")
    after = compute_model_status(model(before, expectedDigest=GATED), None, refused, NOW)
    assert (after["resolvedVersion"], after["artifactDigest"]) == ("2", GATED)
    assert find_condition(after, "Ready")["reason"] == "LastResolutionInUse"  # type: ignore[index]
    assert find_condition(after, "Degraded")["reason"] == reason  # type: ignore[index]
    assert find_condition(after, "Verified")["status"] == "True"  # type: ignore[index]


# --- identities the hub keeps -------------------------------------------------------------------


def test_the_identities_folder_is_one_file_per_user_holding_its_password(tmp_path: Path) -> None:
    (tmp_path / "citynerve-trainer").write_text("s3cret\n")
    (tmp_path / "citynerve-city").write_text("r3ad")
    (tmp_path / "..data").mkdir()  # what a mounted Secret also holds
    (tmp_path / ".hidden").write_text("x")
    assert read_identities(tmp_path) == {"citynerve-city": "r3ad", "citynerve-trainer": "s3cret"}
