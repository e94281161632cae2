"""The Helm charts, rendered without a cluster: lint, schema, RBAC and configuration.

The charts' RBAC is checked rule for rule against the operators' own lists
(``operators/hub/rbac.py``, ``operators/city/rbac.py``, ``onboarding.bootstrap_rbac``), and the
city's agent configuration against ``embedded.join_request``.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from citynerve.operators import cli, helm, images
from citynerve.operators.api import crdgen
from citynerve.operators.city import broker as city_broker
from citynerve.operators.city import main as city_main
from citynerve.operators.city import rbac as city_rbac
from citynerve.operators.city.config import AlertPolicy
from citynerve.operators.federation import onboarding
from citynerve.operators.federation.embedded import join_request
from citynerve.operators.hub import rbac as hub_rbac
from citynerve.operators.localfed import toolchain
from citynerve.workloads.dataplane import broker, names

CHARTS = {"hub": helm.HUB_CHART, "city": helm.CITY_CHART}
NAMESPACES = {"hub": helm.HUB_NAMESPACE, "city": "citynerve"}
CI_VALUES = [(name, path) for name, chart in CHARTS.items() for path in sorted((chart / "ci").glob("*.yaml"))]


def render(chart: str, values: dict[str, Any] | None = None,
           release: str | None = None) -> list[dict[str, Any]]:
    return helm.template(CHARTS[chart], values or {}, release=release or f"citynerve-{chart}",
                         namespace=NAMESPACES[chart])


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def bootstrap_secrets(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Secrets a city chart renders besides its broker key (which it always makes)."""
    return [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] != "citynerve-broker-key"]


def helm_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(toolchain.binary("helm")), *args], capture_output=True, text=True,
                          timeout=60, check=False)


# -- lint and schema ------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize(("chart", "values"), [*[(c, None) for c in CHARTS], *CI_VALUES],
                         ids=lambda v: v.name if isinstance(v, Path) else str(v))
def test_helm_lint_strict(chart: str, values: Path | None) -> None:
    args = ["lint", "--strict", str(CHARTS[chart]), "--namespace", NAMESPACES[chart]]
    proc = helm_run(*args, *(["--values", str(values)] if values else []))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("chart", "values", "named"), [
    ("hub", {"operator": {"checkIntervalSeconds": "soon"}}, "/operator/checkIntervalSeconds"),
    ("hub", {"mlflow": {"enabeld": True}}, "enabeld"),
    ("hub", {"serviceMonitor": {"enabled": "yes"}}, "/serviceMonitor/enabled"),
    ("hub", {"operator": {"resources": {"limits": {"gpu": 1}}}}, "gpu"),
    ("city", {"city": {"heartbeatSeconds": "10"}}, "/city/heartbeatSeconds"),
    ("city", {"city": {"labelz": {"tier": "a"}}}, "labelz"),
    ("city", {"rbac": {"mode": "global"}}, "/rbac/mode"),
    ("city", {"workload": {"mode": "slurm"}}, "/workload/mode"),
    ("city", {"city": {"labels": {"tier": 3}}}, "/city/labels/tier"),
    ("city", {"hub": {"url": "http://plain.example.org"}}, "/hub/url"),
    ("city", {"alerts": {"allowLoopback": "yes"}}, "/alerts/allowLoopback"),
    ("city", {"alerts": {"secretNames": ["citynerve-hub-identity"]}}, "/alerts/secretNames/0"),
])
def test_schema_refuses_wrong_types_and_unknown_keys_naming_them(
        chart: str, values: dict[str, Any], named: str, tmp_path: Path) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    proc = helm_run("template", "x", str(CHARTS[chart]), "--namespace", NAMESPACES[chart],
                    "--values", str(path))
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert named in proc.stderr, proc.stderr


def _schema_nodes(node: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for name, child in (node.get("properties") or {}).items():
        found += _schema_nodes(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        found += _schema_nodes(node["items"], f"{path}[*]")
    return found


@pytest.mark.timeout(30)
@pytest.mark.parametrize("chart", CHARTS)
def test_schema_describes_every_value_and_closes_every_object(chart: str) -> None:
    schema = json.loads((CHARTS[chart] / "values.schema.json").read_text())
    for path, node in _schema_nodes(schema, "values"):
        assert node.get("description"), f"{path} has no description"
        if node.get("type") == "object":
            extra = node.get("additionalProperties")
            # Closed (false), or a map whose values are typed (labels, nodeSelector).
            assert extra is False or (isinstance(extra, dict) and "properties" not in node), \
                f"{path} accepts unknown keys"
    defaults = yaml.safe_load((CHARTS[chart] / "values.yaml").read_text())

    def walk(values: dict[str, Any], node: dict[str, Any], path: str) -> None:
        for key, value in values.items():
            assert key in node["properties"], f"{path}.{key} is in values.yaml but not the schema"
            if isinstance(value, dict) and "properties" in node["properties"][key]:
                walk(value, node["properties"][key], f"{path}.{key}")

    walk(defaults, schema, "values")


# -- RBAC from the operators' own lists -------------------------------------------------------
@pytest.mark.timeout(60)
def test_hub_cluster_role_is_the_hub_operators_rules() -> None:
    docs = render("hub")
    role = one(docs, "ClusterRole", "citynerve-hub")
    assert role["rules"] == hub_rbac.cluster_rules()
    binding = one(docs, "ClusterRoleBinding", "citynerve-hub")
    assert binding["roleRef"]["name"] == "citynerve-hub"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "citynerve-hub",
                                    "namespace": helm.HUB_NAMESPACE}]
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "citynerve-hub"


@pytest.mark.timeout(60)
def test_hub_chart_installs_onboardings_admission_policies_and_bindable_roles() -> None:
    docs = render("hub")
    for expected in (*onboarding.admission_policies(), *onboarding.hub_install_rbac()):
        got = one(docs, expected["kind"], expected["metadata"]["name"])
        for field in ("spec", "rules"):
            assert got.get(field) == expected.get(field), f"{expected['kind']} {expected['metadata']['name']}"
    # Bootstrap identities are per city, made when the administrator invites one: none in the chart.
    assert not [d for d in docs if d["kind"] == "ServiceAccount" and "bootstrap" in d["metadata"]["name"]]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workload_mode", ["local", "kuberay"])
def test_city_role_per_watched_namespace_is_role_rules(workload_mode: str) -> None:
    docs = render("city", {"workload": {"mode": workload_mode},
                           "operator": {"watchNamespaces": ["north", "south"]}})
    roles = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "citynerve-city"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["north", "south"]
    for role in roles:
        assert role["rules"] == city_rbac.role_rules(workload_mode)
    bindings = [d for d in docs if d["kind"] == "RoleBinding" and d["metadata"]["name"] == "citynerve-city"]
    assert {b["metadata"]["namespace"] for b in bindings} == {"north", "south"}
    subject = {"kind": "ServiceAccount", "name": "citynerve-city", "namespace": "citynerve"}
    assert all(b["subjects"] == [subject] for b in bindings)
    # The operator has no cluster-wide permission; the agent's catalogue reads are.
    cluster_wide = sorted(d["metadata"]["name"] for d in docs
                          if d["kind"] in {"ClusterRole", "ClusterRoleBinding"})
    assert cluster_wide == ["citynerve-city-agent", "citynerve-city-agent"]
    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--namespace")] == ["--namespace=north", "--namespace=south"]
    assert f"--workload-mode={workload_mode}" in args


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("alerts", "policy"), [
    ({}, AlertPolicy()),
    ({"allowLoopback": True}, AlertPolicy(allow_loopback=True)),
    ({"allowPrivateNetworks": False, "allowLinkLocal": True},
     AlertPolicy(allow_private_networks=False, allow_link_local=True)),
])
def test_city_alert_policy_values_reach_the_operator(alerts: dict[str, Any], policy: AlertPolicy) -> None:
    docs = render("city", {"alerts": alerts})
    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["operator", "city"]
    assert city_main.parse_options(args[2:])[1].alert_policy == policy


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workload_mode", ["local", "kuberay"])
def test_city_cluster_role_is_cluster_rules(workload_mode: str) -> None:
    docs = render("city", {"rbac": {"mode": "cluster"}, "workload": {"mode": workload_mode}})
    assert one(docs, "ClusterRole", "citynerve-city")["rules"] == city_rbac.cluster_rules(workload_mode)
    assert one(docs, "ClusterRoleBinding", "citynerve-city")["roleRef"]["name"] == "citynerve-city"
    roles = [d["metadata"]["name"] for d in docs if d["kind"] in {"Role", "RoleBinding"}]
    assert all(("-agent-" in name or name.endswith("-broker")) for name in roles), \
        "the operator's own rules are cluster-wide (but the broker's users, in the release namespace)"
    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not [a for a in args if a.startswith("--namespace")]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rbac_mode", ["namespaced", "cluster"])
def test_the_city_operator_may_read_only_the_alert_secrets_it_is_told(rbac_mode: str) -> None:
    secrets = ["duty-webhook", "flood-webhook"]

    def operator_rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return one(docs, "ClusterRole" if rbac_mode == "cluster" else "Role", "citynerve-city")["rules"]

    docs = render("city", {"rbac": {"mode": rbac_mode}, "alerts": {"secretNames": secrets}})
    expected = (city_rbac.cluster_rules("local", secrets) if rbac_mode == "cluster"
                else city_rbac.role_rules("local", secrets))
    assert operator_rules(docs) == expected
    assert [r for r in operator_rules(docs) if "secrets" in r["resources"] and "get" in r["verbs"]] == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": secrets, "verbs": ["get"]}]
    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--alert-secret")] == [f"--alert-secret={s}" for s in secrets]
    # None listed: no Secret at all, rather than an empty resourceNames (which would mean every one).
    plain = render("city", {"rbac": {"mode": rbac_mode}})
    assert not [r for r in operator_rules(plain) if "secrets" in r["resources"] and "get" in r["verbs"]]
    assert not [a for a in one(plain, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
                if a.startswith("--alert-secret")]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rbac_mode", ["namespaced", "cluster"])
def test_city_agent_rules_are_the_agents_in_both_modes(rbac_mode: str) -> None:
    docs = render("city", {"rbac": {"mode": rbac_mode}, "operator": {"workNamespace": "work"}})
    assert one(docs, "ClusterRole", "citynerve-city-agent")["rules"] == city_rbac.agent_cluster_rules()
    work = one(docs, "Role", "citynerve-city-agent-work")
    assert (work["metadata"]["namespace"], work["rules"]) == ("work", city_rbac.agent_work_rules())
    release = one(docs, "Role", "citynerve-city-agent-release")
    assert release["metadata"]["namespace"] == "citynerve"
    assert release["rules"] == city_rbac.agent_release_rules("citynerve-city", "citynerve-city")
    subject = {"kind": "ServiceAccount", "name": "citynerve-city", "namespace": "citynerve"}
    for name in ("citynerve-city-agent-work", "citynerve-city-agent-release"):
        binding = one(docs, "RoleBinding", name)
        assert (binding["roleRef"]["name"], binding["subjects"]) == (name, [subject])
    assert one(docs, "ClusterRoleBinding", "citynerve-city-agent")["subjects"] == [subject]
    config = json.loads(one(docs, "ConfigMap", helm.CITY_CONFIGMAP)["data"][helm.AGENT_CONFIG_KEY])
    assert (config["workNamespace"], config["namespace"], config["deployment"], config["serviceAccount"]) == (
        "work", "citynerve", "citynerve-city", "citynerve-city")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rbac_mode", ["namespaced", "cluster"])
def test_the_operator_writes_the_brokers_users_and_reads_its_key_only(rbac_mode: str) -> None:
    docs = render("city", {"rbac": {"mode": rbac_mode}})
    role = one(docs, "Role", "citynerve-city-broker")
    assert (role["metadata"]["namespace"], role["rules"]) == ("citynerve", city_rbac.broker_release_rules())
    binding = one(docs, "RoleBinding", "citynerve-city-broker")
    subject = {"kind": "ServiceAccount", "name": "citynerve-city", "namespace": "citynerve"}
    assert binding["subjects"] == [subject]
    # The fleets' workers get nothing from the chart: an account without rights, from the operator.
    assert not [d for d in docs if d["kind"] in {"ServiceAccount", "Role", "RoleBinding", "ClusterRole"}
                and d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "ingest"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    _, city = city_main.parse_options(args[2:])
    assert city.broker is not None
    assert (city.broker.url, str(city.broker.key_file), city.broker.namespace) == (
        "nats://citynerve-broker.citynerve.svc:4222", "/etc/citynerve/broker-key/key", "citynerve")
    assert (city.history_storage, city.history_storage_class) == ("1Gi", None)
    history = {"size": "20Gi", "storageClassName": "fast"}
    sized = one(render("city", {"rbac": {"mode": rbac_mode}, "ingest": {"history": history}}), "Deployment")
    _, city = city_main.parse_options(sized["spec"]["template"]["spec"]["containers"][0]["args"][2:])
    assert (city.history_storage, city.history_storage_class) == ("20Gi", "fast")
    assert {"name": "broker-key", "secret": {"secretName": "citynerve-broker-key"}} in pod["volumes"]
    key = one(docs, "Secret", "citynerve-broker-key")
    assert key["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"  # kept across upgrades
    assert len(base64.b64decode(key["data"]["key"])) == 64


# -- the city's configuration -----------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("city", ["shanghai", "chengdu", "ningbo"])
def test_city_agent_config_carries_the_join_request(city: str) -> None:
    connection = helm.HubConnection("https://hub.example.org:6443", "-----BEGIN CERTIFICATE-----\n", "t0ken")
    values = helm.merge_values(helm.city_values(city, connection),
                               {"city": {"labels": {"tier": "pilot"}, "heartbeatSeconds": 3,
                                         "heartbeatTimeoutSeconds": 12}})
    docs = render("city", values)
    config = json.loads(one(docs, "ConfigMap", helm.CITY_CONFIGMAP)["data"][helm.AGENT_CONFIG_KEY])
    assert config["joinRequest"] == join_request(city, 3, 12, {"tier": "pilot"})
    assert config["city"] == city
    assert config["hubServer"] == connection.url
    assert config["hubCaPem"] == connection.ca_pem
    assert config["heartbeatSeconds"] == 3
    assert config["workNamespace"] == "citynerve"
    # The token is in the Secret `city onboard` writes (helm.bootstrap_secret), not in the values.
    assert (config["bootstrapSecret"], config["bootstrapSecretKey"]) == (helm.CITY_BOOTSTRAP_SECRET, "token")
    assert "t0ken" not in yaml.safe_dump(values)
    assert not bootstrap_secrets(docs)
    assert helm.bootstrap_secret("t0ken", "citynerve")["data"]["token"] == "dDBrZW4="  # base64 of t0ken


@pytest.mark.timeout(60)
def test_city_name_defaults_to_the_release_and_existing_secret_wins() -> None:
    docs = render("city", {"hub": {"bootstrap": {"existingSecret": "from-vault", "token": "ignored"}}},
                  release="hangzhou")
    config = json.loads(one(docs, "ConfigMap", helm.CITY_CONFIGMAP)["data"][helm.AGENT_CONFIG_KEY])
    assert config["city"] == "hangzhou"
    assert config["joinRequest"]["spec"]["displayName"] == "Hangzhou"
    assert config["bootstrapSecret"] == "from-vault"
    assert not bootstrap_secrets(docs)


# -- pods: restricted security, resources; optional parts -----------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("chart", "values"), CI_VALUES, ids=lambda v: v.name if isinstance(v, Path) else v)
def test_every_pod_is_restricted_and_bounded(chart: str, values: Path) -> None:
    docs = render(chart, yaml.safe_load(values.read_text()) or {})
    pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"]
    assert pods
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert set(container["resources"]) == {"requests", "limits"}
            assert container["image"] == images.reference(), "a chart image that `make images` does not build"
    for doc in docs:
        labels = doc["metadata"].get("labels") or {}
        assert labels.get("app.kubernetes.io/part-of") == "citynerve", doc["metadata"]["name"]
        assert labels.get("app.kubernetes.io/managed-by") == "Helm"


@pytest.mark.timeout(60)
def test_hub_optional_parts_render_only_when_enabled() -> None:
    plain = {d["kind"] for d in render("hub")}
    assert {"ServiceMonitor", "PersistentVolumeClaim", "Service"}.isdisjoint(plain)
    full = render("hub", {"mlflow": {"enabled": True}, "serviceMonitor": {"enabled": True}})
    assert {"ServiceMonitor", "PersistentVolumeClaim", "Service"} <= {d["kind"] for d in full}
    container = one(full, "Deployment", "citynerve-hub")["spec"]["template"]["spec"]["containers"][0]
    assert f"--mlflow-url=http://citynerve-hub-mlflow.{helm.HUB_NAMESPACE}.svc:5000" in container["args"]
    assert container["env"][0] == {"name": "CITYNERVE_PROMETHEUS_PORT", "value": "9090"}
    assert container["ports"][0] == {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}
    external = render("hub", {"mlflow": {"externalUrl": "https://mlflow.example.org"}})
    args = one(external, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--mlflow-url=https://mlflow.example.org" in args
    plain_args = one(render("hub"), "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not [a for a in plain_args if a.startswith("--mlflow-url")]


@pytest.mark.timeout(60)
def test_hub_mlflow_requires_authentication_with_passwords_only_in_a_secret() -> None:
    docs = render("hub", {"mlflow": {"enabled": True}})
    secret = one(docs, "Secret", "citynerve-hub-mlflow-auth")
    assert set(secret["data"]) == {"admin-password", "trainer-password", "city-password", "flask-secret-key"}
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    server = one(docs, "Deployment", "citynerve-hub-mlflow")["spec"]["template"]["spec"]
    script = server["containers"][0]["args"][0]
    assert "--app-name=basic-auth" in script
    assert "default_permission = READ" in script
    env = {e["name"]: e for e in server["containers"][0]["env"]}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "citynerve-hub-mlflow-auth", "key": "admin-password"}
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "flask-secret-key"
    assert {"name": "auth-config", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}} in server["volumes"]
    # The hub operator is the admin (MLflow's own variables) and keeps the trainer and city identities.
    operator = one(docs, "Deployment", "citynerve-hub")["spec"]["template"]["spec"]
    container = operator["containers"][0]
    hub_env = {e["name"]: e for e in container["env"]}
    assert hub_env["MLFLOW_TRACKING_USERNAME"]["value"] == "citynerve-hub"
    assert hub_env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "admin-password"
    assert "--mlflow-users=/etc/citynerve/mlflow-users" in container["args"]
    users = next(v for v in operator["volumes"] if v["name"] == "mlflow-users")["secret"]["items"]
    assert users == [{"key": "trainer-password", "path": "citynerve-trainer"},
                     {"key": "city-password", "path": "citynerve-city"}]
    # No password in any value the chart renders in the clear.
    rendered = yaml.safe_dump_all([d for d in docs if d["kind"] != "Secret"])
    assert not [v for v in secret["data"].values() if v in rendered]
    # An existing Secret wins; an external server without one gives the operator no identity.
    existing = render("hub", {"mlflow": {"enabled": True, "auth": {"existingSecret": "from-vault"}}})
    secrets = {d["metadata"]["name"] for d in existing if d["kind"] == "Secret"}
    assert "citynerve-hub-mlflow-auth" not in secrets
    assert "from-vault" in yaml.safe_dump(one(existing, "Deployment", "citynerve-hub-mlflow"))
    external = render("hub", {"mlflow": {"externalUrl": "https://mlflow.example.org"}})
    external_env = one(external, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert "MLFLOW_TRACKING_PASSWORD" not in {e["name"] for e in external_env}


@pytest.mark.timeout(60)
def test_city_reads_mlflow_with_the_credentials_secret_it_is_given() -> None:
    docs = render("city", {"operator": {"mlflowUrl": "http://mlflow:5000",
                                        "mlflowCredentialsSecret": "mlflow-reader"}})
    env = {e["name"]: e for e in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_TRACKING_USERNAME"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-reader",
                                                                            "key": "username"}
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-reader",
                                                                            "key": "password"}
    plain = one(render("city"), "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert "MLFLOW_TRACKING_PASSWORD" not in {e["name"] for e in plain}


@pytest.mark.timeout(30)
def test_chart_crds_are_the_generated_ones_and_notes_say_how_to_approve() -> None:
    generated = crdgen.generate()
    for chart in CHARTS.values():
        on_disk = {p.name: p.read_text(encoding="utf-8") for p in (chart / "crds").glob("*.yaml")}
        assert on_disk == generated, f"{chart.name}/crds is stale; run `make crds`"
    notes = (helm.HUB_CHART / "templates" / "NOTES.txt").read_text()
    assert "kubectl patch city NAME --type merge -p '{\"spec\":{\"approved\":true}}'" in notes
    assert "monitoring.coreos.com" in (helm.HUB_CHART / "README.md").read_text()


# -- the CLI's side ----------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_cli_parses_the_chart_commands() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["city", "onboard", "ningbo", "--hub-context", "hub", "--city-context", "nb",
                              "--values", "v.yaml", "--wait-ready"])
    assert (args.name, args.hub_context, args.city_context, args.wait_ready) == ("ningbo", "hub", "nb", True)
    assert args.values == Path("v.yaml")
    args = parser.parse_args(["hub", "install", "--context", "hub"])
    assert (args.hub_command, args.namespace) == ("install", onboarding.SYSTEM_NAMESPACE)
    args = parser.parse_args(["city", "offboard", "ningbo", "--city-context", "nb"])
    assert args.city_command == "offboard"


@pytest.mark.timeout(30)
def test_city_values_follow_the_known_cities_and_user_values_win(tmp_path: Path) -> None:
    values = helm.city_values("shanghai", None)
    assert values == {"city": {"name": "shanghai", "displayName": "Shanghai", "region": "east",
                               "dataResidency": {"jurisdiction": "CN-SH"}, "heartbeatSeconds": 10,
                               "heartbeatTimeoutSeconds": 40}}
    merged = helm.merge_values(values, {"city": {"region": "delta"}, "rbac": {"mode": "cluster"}})
    assert merged["city"]["region"] == "delta"
    assert merged["city"]["displayName"] == "Shanghai"
    assert merged["rbac"] == {"mode": "cluster"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(TypeError, match="must hold a mapping"):
        helm.read_values_file(bad)
    assert cli.main(["hub", "install", "--values", str(bad)]) == 1


# -- each city's own fleets -------------------------------------------------------------------
SAMPLE_CITY_VALUES = sorted((Path(__file__).resolve().parents[1] / "samples" / "helm").glob("values-*.yaml"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("values_file", SAMPLE_CITY_VALUES, ids=lambda p: p.stem)
def test_a_city_values_file_renders_its_own_fleets(values_file: Path) -> None:
    values = helm.read_values_file(values_file)
    docs = render("city", values)
    fleets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "SensorFleet"}
    assert list(fleets) == [f["name"] for f in values["fleets"]]
    for given in values["fleets"]:
        rendered = fleets[given["name"]]
        assert rendered["spec"] == given["spec"]
        assert rendered["metadata"]["namespace"] == NAMESPACES["city"]
        assert rendered["metadata"]["labels"]["app.kubernetes.io/component"] == "sensor-fleet"


@pytest.mark.timeout(30)
def test_the_cities_sample_values_name_different_fleets() -> None:
    names = [{f["name"] for f in helm.read_values_file(p)["fleets"]} for p in SAMPLE_CITY_VALUES]
    assert len(names) >= 2
    assert not set.intersection(*names), "two cities' sample values share fleet names"


@pytest.mark.timeout(30)
def test_the_fleet_schema_of_the_values_follows_the_sensorfleet_model() -> None:
    from citynerve.operators.api.city import SensorFleetSpec  # noqa: PLC0415

    model = SensorFleetSpec.model_json_schema(by_alias=True)
    schema = json.loads((CHARTS["city"] / "values.schema.json").read_text())
    spec = schema["properties"]["fleets"]["items"]["properties"]["spec"]
    assert set(spec["properties"]) == set(model["properties"])
    assert set(spec["required"]) == set(model.get("required", []))
    for name, node in model["properties"].items():
        assert spec["properties"][name].get("enum") == node.get("enum"), name


@pytest.mark.timeout(60)
def test_a_fleet_with_an_unknown_field_is_refused_by_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump({"fleets": [{"name": "pudong-pressure", "spec": {
        "sensorType": "pipe-pressure-gauge", "district": "pudong", "count": 10, "owner": "operator",
        "samplingInterval": 60}}]}))
    proc = helm_run("lint", "--strict", str(CHARTS["city"]), "--values", str(path))
    assert proc.returncode != 0
    assert "samplingInterval" in proc.stdout + proc.stderr


# -- probes, heartbeat rule, MLflow server version ----------------------------------------------
PROBED_VALUES = [("hub", {"mlflow": {"enabled": True}}), ("city", {}),
                 *[(chart, yaml.safe_load(path.read_text()) or {}) for chart, path in CI_VALUES]]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("chart", "values"), PROBED_VALUES)
def test_every_container_of_every_deployment_is_probed_on_a_port_it_declares(
        chart: str, values: dict[str, Any]) -> None:
    deployments = [d for d in render(chart, values) if d["kind"] == "Deployment"]
    assert deployments
    for deployment in deployments:
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            declared = {p["name"] for p in container.get("ports") or []} | {
                p["containerPort"] for p in container.get("ports") or []}
            where = f"{deployment['metadata']['name']}/{container['name']}"
            for kind in ("readinessProbe", "livenessProbe"):
                probe = container.get(kind)
                assert probe, f"{where} has no {kind}"
                assert probe["httpGet"]["port"] in declared, f"{where}'s {kind} asks an undeclared port"
                assert probe["httpGet"]["path"].startswith("/")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chart", CHARTS)
def test_operators_serve_their_health_endpoint_on_the_probed_port(chart: str) -> None:
    from citynerve.operators.runtime import ENV_HEALTH_PORT, HEALTH_PATH  # noqa: PLC0415

    container = one(render(chart, {"health": {"port": 8181}}), "Deployment",
                    f"citynerve-{chart}")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env[ENV_HEALTH_PORT] == "8181"
    assert {"name": "health", "containerPort": 8181, "protocol": "TCP"} in container["ports"]
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[kind]["httpGet"] == {"path": HEALTH_PATH, "port": "health"}
    # The metrics port is served on the pod's address, where the probes and Prometheus reach it.
    assert env["CITYNERVE_PROMETHEUS_ADDRESS"] == "0.0.0.0"  # noqa: S104 - the point of the test


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("interval", "timeout"), [(10, 10), (30, 20), (10, 2)])
def test_city_chart_refuses_a_heartbeat_timeout_the_city_resource_would_refuse(
        interval: int, timeout: int) -> None:
    proc = helm_run("template", "x", str(CHARTS["city"]), "--namespace", NAMESPACES["city"], "--set",
                    f"city.heartbeatSeconds={interval}", "--set", f"city.heartbeatTimeoutSeconds={timeout}")
    assert proc.returncode != 0
    named = (f"city.heartbeatTimeoutSeconds ({timeout}) must be greater than "
             f"city.heartbeatSeconds ({interval})")
    assert named in proc.stderr, proc.stderr


@pytest.mark.timeout(60)
def test_city_chart_accepts_the_heartbeat_pairs_the_city_resource_accepts() -> None:
    from citynerve.operators.api.hub import CityConnection  # noqa: PLC0415

    for interval, timeout in ((10, 11), (2, 8), (10, 40)):
        CityConnection.model_validate({"heartbeatIntervalSeconds": interval,
                                       "heartbeatTimeoutSeconds": timeout})
        docs = render("city", {"city": {"heartbeatSeconds": interval, "heartbeatTimeoutSeconds": timeout}})
        config = json.loads(one(docs, "ConfigMap", helm.CITY_CONFIGMAP)["data"][helm.AGENT_CONFIG_KEY])
        assert config["joinRequest"]["spec"]["connection"] == {"heartbeatIntervalSeconds": interval,
                                                               "heartbeatTimeoutSeconds": timeout}


@pytest.mark.timeout(60)
def test_hub_mlflow_server_is_the_mlflow_the_project_runs() -> None:
    server = one(render("hub", {"mlflow": {"enabled": True}}), "Deployment", "citynerve-hub-mlflow")
    operator = one(render("hub", {"mlflow": {"enabled": True}}), "Deployment", "citynerve-hub")
    image = server["spec"]["template"]["spec"]["containers"][0]["image"]
    # The CityNerve image, built from this repository's dependencies: its MLflow is the clients'.
    assert image == operator["spec"]["template"]["spec"]["containers"][0]["image"] == images.reference()
    assert "image" not in yaml.safe_load((CHARTS["hub"] / "values.yaml").read_text())["mlflow"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("chart", CHARTS)
def test_chart_app_version_is_the_package_version(chart: str) -> None:
    app_version = yaml.safe_load((CHARTS[chart] / "Chart.yaml").read_text())["appVersion"]
    assert app_version == images.package_version()


@pytest.mark.timeout(60)
def test_hub_mlflow_server_accepts_its_service_names_and_the_given_hosts_only() -> None:
    from mlflow.server.security_utils import is_allowed_host_header  # noqa: PLC0415

    server = one(render("hub", {"mlflow": {"enabled": True, "allowedHosts": ["mlflow.example.org"]}}),
                 "Deployment", "citynerve-hub-mlflow")
    env = {e["name"]: e.get("value") for e in server["spec"]["template"]["spec"]["containers"][0]["env"]}
    allowed = env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    service = f"citynerve-hub-mlflow.{helm.HUB_NAMESPACE}.svc"
    for host in (f"{service}:5000", service, "citynerve-hub-mlflow:5000", "10.244.1.7:5000",
                 "172.20.0.3:5000", "localhost:5000", "[::1]:5000", "mlflow.example.org"):
        assert is_allowed_host_header(allowed, host), host
    for host in ("evil.example.org", "mlflow.example.org.evil.example.org:5000", "8.8.8.8:5000"):
        assert not is_allowed_host_header(allowed, host), host


# -- the join token: in a Secret of its own, never in the values ------------------------------------
@pytest.mark.timeout(60)
def test_onboarding_puts_the_join_token_in_a_secret_and_names_it_in_the_values() -> None:
    connection = helm.HubConnection("https://hub.example.org:6443", "-----BEGIN CERTIFICATE-----\n", "t0ken")
    values, secret = helm.onboarding_values("ningbo", connection, {"rbac": {"mode": "cluster"}}, "cn-city")
    assert secret is not None
    assert (secret["metadata"]["name"], secret["metadata"]["namespace"]) == (helm.CITY_BOOTSTRAP_SECRET,
                                                                              "cn-city")
    assert secret["data"] == {"token": "dDBrZW4="}  # base64 of t0ken
    assert secret["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "citynerve"
    assert values["hub"]["bootstrap"] == {"existingSecret": helm.CITY_BOOTSTRAP_SECRET}
    assert "t0ken" not in yaml.safe_dump(values)
    docs = render("city", values)
    config = json.loads(one(docs, "ConfigMap", helm.CITY_CONFIGMAP)["data"][helm.AGENT_CONFIG_KEY])
    assert config["bootstrapSecret"] == helm.CITY_BOOTSTRAP_SECRET
    volumes = one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"secretName": helm.CITY_BOOTSTRAP_SECRET, "optional": True} in [v.get("secret") for v in volumes]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("own", [{"token": "mine"}, {"existingSecret": "from-vault"}])
def test_a_users_own_bootstrap_credential_wins_and_no_secret_is_written(own: dict[str, str]) -> None:
    connection = helm.HubConnection("https://hub.example.org:6443", "", "t0ken")
    values, secret = helm.onboarding_values("ningbo", connection, {"hub": {"bootstrap": own}}, "citynerve")
    assert secret is None
    assert values["hub"]["bootstrap"] == own
    assert "t0ken" not in yaml.safe_dump(values)
    # An inline token still works: the chart keeps it in a Secret of its own.
    secrets = bootstrap_secrets(render("city", values))
    assert [s["data"]["token"] for s in secrets] == (["bWluZQ=="] if "token" in own else [])  # base64 of mine


@pytest.mark.timeout(300)
def test_the_hub_charts_mlflow_start_script_serves_with_authentication_and_its_allowed_hosts(
        tmp_path: Path) -> None:
    """The chart's own start script, run with the project's MLflow (the version its image tag names) in
    folders of this test instead of the pod's volumes: /health answers, the Service's name is served
    (behind authentication), an unknown Host is refused."""
    import base64  # noqa: PLC0415
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import time  # noqa: PLC0415
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    from citynerve.operators.localfed.cluster import free_port  # noqa: PLC0415

    server = one(render("hub", {"mlflow": {"enabled": True}}), "Deployment", "citynerve-hub-mlflow")
    container = server["spec"]["template"]["spec"]["containers"][0]
    port = free_port()
    script = (container["args"][0].replace("////mlflow/", f"///{tmp_path}/")
              .replace("=/mlflow/", f"={tmp_path}/").replace("--host=0.0.0.0", "--host=127.0.0.1")
              .replace("--port=5000", f"--port={port}"))
    assert "/mlflow/" not in script
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    password = "admin-pass%word"  # a '%' must survive the configuration file (the script escapes it)
    env.update({"HOME": str(tmp_path), "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
                "MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_FLASK_SERVER_SECRET_KEY": "k" * 32,
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
    base = f"http://127.0.0.1:{port}"

    def status(path: str, host: str, auth: bool) -> int:
        request = urllib.request.Request(base + path, headers={"Host": host})  # noqa: S310 - loopback http
        if auth:
            login = base64.b64encode(f"{env['MLFLOW_AUTH_ADMIN_USERNAME']}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {login}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback http
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    log = (tmp_path / "mlflow.log").open("wb")
    process = subprocess.Popen([*container["command"], script], env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while status("/health", "127.0.0.1", auth=False) != 200:
            assert process.poll() is None, (tmp_path / "mlflow.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the MLflow server did not answer /health"
            time.sleep(1)
        search = "/api/2.0/mlflow/experiments/search?max_results=1"
        service = f"citynerve-hub-mlflow.{helm.HUB_NAMESPACE}.svc:5000"
        assert status(search, service, auth=True) == 200
        assert status(search, service, auth=False) == 401
        assert status(search, "mlflow.attacker.example:5000", auth=True) == 403
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(60)
        log.close()


# -- the city's broker ------------------------------------------------------------------------
def _broker_pod(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = one(docs, "StatefulSet", "citynerve-broker")["spec"]["template"]["spec"]
    [container] = spec["containers"]
    return spec, container


def _mount_of(spec: dict[str, Any], container: dict[str, Any], path: PurePosixPath) -> dict[str, Any]:
    """The volume whose mount holds ``path``."""
    [mount] = [m for m in container["volumeMounts"] if path.is_relative_to(m["mountPath"])]
    if mount["name"] == "jetstream":
        return {"name": "jetstream", "claim": True}
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    return volume


@pytest.mark.timeout(60)
def test_the_broker_config_is_the_one_the_broker_module_renders() -> None:
    docs = render("city", {"city": {"name": "chengdu"}, "broker": {"maxPayload": 1048576}})
    config = one(docs, "ConfigMap", "citynerve-broker-config")["data"]["nats.conf"]
    _, container = _broker_pod(docs)
    args = broker.argument_parser().parse_args(container["command"][3:])
    assert config == broker.render_server_config(
        server_name="chengdu", host="0.0.0.0",  # noqa: S104 - the pod's listeners, on every interface
        client_port=names.CLIENT_PORT, mqtt_port=names.MQTT_PORT,
        monitor_port=names.MONITOR_PORT, store_dir="/data/jetstream",
        auth_file=os.path.relpath(args.auth_include, args.config.parent), max_payload=1048576)


@pytest.mark.timeout(60)
def test_the_broker_pod_runs_the_supervisor_on_the_operators_secret_and_a_claim() -> None:
    docs = render("city")
    spec, container = _broker_pod(docs)
    assert container["command"][:3] == ["python3", "-m", "citynerve.workloads.dataplane.broker"]
    args = broker.argument_parser().parse_args(container["command"][3:])
    posix = {k: PurePosixPath(str(v)) for k, v in vars(args).items()}
    assert _mount_of(spec, container, posix["config"])["configMap"]["name"] == "citynerve-broker-config"
    # The users: the Secret the city operator writes, optional (the server denies all until then) …
    assert _mount_of(spec, container, posix["auth_file"])["secret"] == {
        "secretName": city_rbac.BROKER_AUTH_SECRET, "optional": True}
    assert posix["auth_file"].name == city_broker.AUTH_KEY
    # … copied by the supervisor to a writable place, which the server config includes.
    assert "emptyDir" in _mount_of(spec, container, posix["auth_include"])
    store = PurePosixPath("/data/jetstream")
    assert _mount_of(spec, container, store) == {"name": "jetstream", "claim": True}
    assert args.nats_server == "/usr/local/bin/nats-server"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"client": names.CLIENT_PORT, "mqtt": names.MQTT_PORT, "monitor": names.MONITOR_PORT}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == "monitor"
        assert container[probe]["httpGet"]["path"].startswith("/healthz")
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    statefulset = one(docs, "StatefulSet", "citynerve-broker")
    assert statefulset["spec"]["replicas"] == 1
    assert statefulset["spec"]["serviceName"] == one(docs, "Service", "citynerve-broker-headless")[
        "metadata"]["name"]
    service = one(docs, "Service", "citynerve-broker")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "client": names.CLIENT_PORT, "mqtt": names.MQTT_PORT}
    selector = service["spec"]["selector"]
    assert all(statefulset["spec"]["template"]["metadata"]["labels"][k] == v for k, v in selector.items())
    operator = one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert operator["app.kubernetes.io/component"] != selector["app.kubernetes.io/component"]


@pytest.mark.timeout(60)
def test_the_broker_honours_every_value() -> None:
    values = {
        "image": {"repository": "registry.example.org/citynerve", "tag": "1.2.3", "pullPolicy": "Always"},
        "imagePullSecrets": ["pull"],
        "broker": {
            "storage": {"size": "50Gi", "storageClassName": "fast-ssd"},
            "service": {"type": "LoadBalancer", "annotations": {"lb.example.org/internal": "false"}},
            "resources": {"requests": {"cpu": "250m", "memory": "512Mi"},
                          "limits": {"cpu": "2", "memory": "2Gi"}},
            "podAnnotations": {"example.org/team": "water"},
            "nodeSelector": {"disk": "ssd"},
            "tolerations": [{"key": "broker", "operator": "Exists", "effect": "NoSchedule"}],
            "priorityClassName": "city-critical",
        },
    }
    docs = render("city", values)
    statefulset = one(docs, "StatefulSet", "citynerve-broker")
    spec, container = _broker_pod(docs)
    [claim] = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    assert container["image"] == "registry.example.org/citynerve:1.2.3"
    assert container["imagePullPolicy"] == "Always"
    assert spec["imagePullSecrets"] == [{"name": "pull"}]
    assert container["resources"] == values["broker"]["resources"]
    assert statefulset["spec"]["template"]["metadata"]["annotations"]["example.org/team"] == "water"
    assert spec["nodeSelector"] == {"disk": "ssd"}
    assert spec["tolerations"] == values["broker"]["tolerations"]
    assert spec["priorityClassName"] == "city-critical"
    service = one(docs, "Service", "citynerve-broker")
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["metadata"]["annotations"] == {"lb.example.org/internal": "false"}
    # Defaults: the cluster's default StorageClass, no extra scheduling constraints.
    spec, _ = _broker_pod(render("city"))
    assert "storageClassName" not in one(render("city"), "StatefulSet", "citynerve-broker")["spec"][
        "volumeClaimTemplates"][0]["spec"]
    assert not {"nodeSelector", "tolerations", "priorityClassName", "imagePullSecrets"} & set(spec)


@pytest.mark.timeout(60)
def test_the_brokers_network_policy_names_who_may_reach_each_port() -> None:
    mqtt = [{"ipBlock": {"cidr": "10.20.0.0/16"}}]
    scrape = [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]
    docs = render("city", {"ingest": {"namespaces": ["water", "citynerve"]},
                           "broker": {"mqttClients": mqtt}, "networkPolicy": {"metricsClients": scrape}})
    rules = {r["ports"][0]["port"]: r.get("from") for r in
             one(docs, "NetworkPolicy", "citynerve-broker")["spec"]["ingress"]}
    assert rules["client"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}
                               for ns in ("water", "citynerve")]
    assert rules["mqtt"] == mqtt
    assert rules["monitor"] == scrape
    open_mqtt = one(render("city"), "NetworkPolicy", "citynerve-broker")["spec"]["ingress"]
    assert [r.get("from") for r in open_mqtt if r["ports"][0]["port"] == "mqtt"] == [None]  # anyone
    assert [d for d in render("city", {"networkPolicy": {"enabled": False}})
            if d["kind"] == "NetworkPolicy"] == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("values", "named"), [
    ({"broker": {"storage": {"size": "lots"}}}, "/broker/storage/size"),
    ({"broker": {"maxPayload": "8MB"}}, "/broker/maxPayload"),
    ({"broker": {"service": {"type": "ExternalName"}}}, "/broker/service/type"),
    ({"broker": {"replicas": 3}}, "replicas"),
])
def test_the_schema_refuses_wrong_broker_values_naming_them(values: dict[str, Any], named: str,
                                                            tmp_path: Path) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    proc = helm_run("template", "x", str(CHARTS["city"]), "--values", str(path))
    assert proc.returncode != 0
    assert named in proc.stderr
