"""The city operator's command line, RBAC rules, registry handlers and artifact digests (no cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest
from citynerve.models.registry import artifact_digest
from citynerve.operators.city import main, rbac
from citynerve.operators.city.config import CityOptions
from citynerve.operators.city.handlers import build_registry
from citynerve.operators.city.reconcile import rayjob_observation

pytestmark = pytest.mark.timeout(20)


def test_command_line_options(tmp_path: Path) -> None:
    options, city = main.parse_options(
        [
            "--kubeconfig",
            str(tmp_path / "k"),
            "--context",
            "shanghai",
            "--namespace",
            "a",
            "--namespace",
            "b",
            "--city",
            "chengdu",
            "--mlflow-url",
            "http://127.0.0.1:5000",
            "--workload-mode",
            "kuberay",
            "--peering",
            "citynerve",
        ]
    )
    assert options.namespaces == ("a", "b")
    assert not options.clusterwide
    assert (options.target.context, options.peering) == ("shanghai", "citynerve")
    assert (city.city, city.workload_mode, city.mlflow_url) == ("chengdu", "kuberay", "http://127.0.0.1:5000")
    options, _ = main.parse_options(["--city", "chengdu"])
    assert options.clusterwide


def test_alert_secrets_are_named_one_by_one_and_never_the_agents_key() -> None:
    _, city = main.parse_options(["--city", "chengdu", "--alert-secret", "duty-webhook",
                                  "--alert-secret=flood-webhook", "--alert-secret", "duty-webhook"])
    assert city.alert_secrets == ("duty-webhook", "flood-webhook")
    assert main.parse_options(["--city", "chengdu"])[1].alert_secrets == ()
    with pytest.raises(SystemExit):
        main.parse_options(["--city", "chengdu", "--alert-secret", rbac.IDENTITY_SECRET])


def test_the_city_is_named_never_assumed(capsys: pytest.CaptureFixture[str]) -> None:
    # A Chengdu operator started without --city must not join the federation as another city.
    with pytest.raises(SystemExit):
        main.parse_options([])
    assert "--city" in capsys.readouterr().err


def test_rbac_rules_cover_every_kind_and_child() -> None:
    rules = rbac.role_rules("kuberay", ["duty-webhook"])
    resources = {r for rule in rules for r in rule["resources"]}
    assert {
        "sensorfleets",
        "analyticsmodels",
        "scenarios",
        "incidents",
        "deployments",
        "rayjobs",
        "secrets",
        "serviceaccounts",
        "services",
        "events",
    } <= resources
    reads = [rule for rule in rules if "secrets" in rule["resources"] and "get" in rule["verbs"]]
    # HMAC keys are read one by one, never listed, and only those the chart names.
    assert reads == [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["duty-webhook"],
                      "verbs": ["get"]}]
    # Fleets' broker credentials are created, never read back (they derive from the broker key);
    # without alert Secrets no Secret can be read at all (an empty resourceNames means every one).
    plain = rbac.role_rules("kuberay")
    assert {v for rule in plain if "secrets" in rule["resources"] for v in rule["verbs"]} == {"create"}
    assert "rayjobs" not in {r for rule in rbac.role_rules("local") for r in rule["resources"]}
    assert len(rbac.cluster_rules()) > len(rbac.role_rules())
    # Fleets' workers get no API rights, so the operator needs nothing to grant: no RBAC writes.
    assert not {"roles", "rolebindings"} & resources
    assert not {v for rule in rules for v in rule["verbs"]} & {"bind", "escalate", "impersonate", "*"}
    broker = rbac.broker_release_rules()
    assert {v for rule in broker for v in rule["verbs"]} == {"create", "patch"}
    assert next(r for r in broker if "patch" in r["verbs"])["resourceNames"] == [rbac.BROKER_AUTH_SECRET]


def test_registry_has_thin_event_handlers_named_by_kind(tmp_path: Path) -> None:
    from citynerve.operators.runtime import KubeTarget, OperatorOptions  # noqa: PLC0415

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: 'https://127.0.0.1:1'}\n"
        "users:\n- name: u\n  user: {token: t}\ncontexts:\n- name: c\n  context: {cluster: c, user: u}\n"
        "current-context: c\n"
    )
    options = OperatorOptions("city-test", KubeTarget(kubeconfig, "c"))
    registry = build_registry(options, CityOptions(city="shanghai", workload_mode="kuberay"))
    names = {h.id.rsplit(".", 1)[-1] for h in registry._watching.get_all_handlers()}
    assert {
        "sensorfleet_event",
        "analyticsmodel_event",
        "scenario_event",
        "incident_event",
        "deployment_event",
        "rayjob_event",
    } <= names
    assert not registry._changing.get_all_handlers()  # no change handlers: no last-handled annotations
    assert not registry._spawning.get_all_handlers()  # no timers or daemons: no finalizers


def test_artifact_digest_covers_content_and_names(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"\x00" * 10)
    (tmp_path / "model" / "MLmodel").write_text("flavors: {}\n")
    first = artifact_digest(tmp_path / "model")
    assert first.startswith("sha256:")
    assert len(first) == 71
    assert artifact_digest(tmp_path / "model") == first
    (tmp_path / "model" / "weights.bin").write_bytes(b"\x00" * 9 + b"\x01")
    assert artifact_digest(tmp_path / "model") != first


@pytest.mark.parametrize(
    ("status", "state"),
    [
        ({}, "Pending"),
        ({"jobDeploymentStatus": "Initializing"}, "Pending"),
        ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, "Running"),
        ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, "Succeeded"),
        ({"jobDeploymentStatus": "Failed", "message": "no head"}, "Failed"),
    ],
)
def test_rayjob_status_maps_to_workload_state(status: dict[str, str], state: str) -> None:
    observed = rayjob_observation({"metadata": {"name": "j"}, "status": status})
    assert observed.state == state
