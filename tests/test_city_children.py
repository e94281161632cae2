"""Pure builders of the city operator: children, payloads, incidents (no cluster)."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from citynerve.models.incidents import DrillTruth, IncidentEvent, IncidentLocation, Measurement
from citynerve.operators.api import from_manifest
from citynerve.operators.city import children
from citynerve.operators.city.config import CityOptions
from citynerve.workloads.ingest.sensor_type import SensorType
from citynerve.workloads.sim.gateway import gateway_batch

pytestmark = pytest.mark.timeout(10)
SAMPLES = Path(__file__).resolve().parents[1] / "samples"
OPTIONS = CityOptions(city="shanghai")


def fleet(name: str = "pudong-pressure", count: int = 4200, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "citynerve.io/v1alpha1",
        "kind": "SensorFleet",
        "metadata": {"name": name, "namespace": "city", "uid": "uid-1", "generation": 1},
        "spec": {
            "sensorType": "pipe-pressure-gauge",
            "district": "pudong",
            "count": count,
            "owner": "operator",
            "samplingIntervalSeconds": 60,
            **spec,
        },
    }


def scenario(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "citynerve.io/v1alpha1",
        "kind": "Scenario",
        "metadata": {"name": "burst-drill", "namespace": "city", "uid": "uid-s", "generation": 1},
        "spec": {
            "kind": "water-burst",
            "mode": "drill",
            "fleets": [{"name": "pudong-pressure"}],
            "models": [{"name": "burst-detector"}],
            "thresholds": [{"metric": "pressureDropKpa", "unitCode": "KPA", "warning": 50, "alarm": 120}],
            "simulation": {"engine": "wntr", "network": "Net1", "event": "burst:22"},
            **spec,
        },
    }


MODELS = {
    "burst-detector": {
        "spec": {"registeredModel": "water-burst-detector", "alias": "champion"},
        "status": {
            "resolvedVersion": "2",
            "modelUri": "models:/water-burst-detector/2",
            "artifactDigest": "sha256:" + "a" * 64,
        },
    }
}


TYPE_SPEC = {"dataModel": "WaterObserved", "properties": [
    {"name": "pressure", "unitCode": "KPA", "minimum": "0", "maximum": "1600"}]}
BROKER_URL = "nats://citynerve-broker.citynerve-system.svc:4222"


def deployment(obj: dict[str, Any] | None = None, type_spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return children.desired_ingest_deployment(obj or fleet(), OPTIONS, type_spec or TYPE_SPEC, BROKER_URL)


def test_ingest_deployment_is_deterministic_and_owned() -> None:
    first = deployment()
    assert first == deployment()
    assert first["metadata"]["name"] == "pudong-pressure-ingest"
    owner = first["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("SensorFleet", "uid-1", True)
    # one consumer makes a fleet's windows: one replica, replaced rather than rolled
    assert (first["spec"]["replicas"], first["spec"]["strategy"]) == (1, {"type": "Recreate"})
    pod = first["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == children.desired_ingest_service_account(fleet())["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is False  # the worker talks to the broker only
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    config = json.loads(env["CITYNERVE_FLEET_CONFIG"])
    assert config == children.fleet_config(fleet(), "shanghai", TYPE_SPEC, BROKER_URL)
    assert (config["city"], config["fleet"], config["count"], config["brokerUrl"]) == (
        "shanghai", "pudong-pressure", 4200, BROKER_URL)
    assert config["sensorTypeSpec"] == TYPE_SPEC  # no API access needed to validate
    assert (config["windowSeconds"], config["allowedLatenessSeconds"]) == (300, 60)
    assert pod["volumes"] == [
        {"name": "broker", "secret": {"secretName": "pudong-pressure-ingest-broker"}},
        {"name": "history", "persistentVolumeClaim": {"claimName": "pudong-pressure-history"}},
    ]
    claim = children.desired_history_claim(fleet(), CityOptions(city="shanghai", history_storage="5Gi",
                                                                history_storage_class="fast"))
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "5Gi"}},
                             "storageClassName": "fast"}
    mount = pod["containers"][0]["volumeMounts"][0]
    assert (mount["mountPath"], mount["readOnly"]) == (children.BROKER_CREDENTIALS_DIR, True)
    args = pod["containers"][0]["args"]
    assert args[:3] == ["python", "-m", "citynerve.workloads.dataplane.worker"]
    assert args[args.index("--history-dir") + 1] == children.HISTORY_DIR
    assert args[args.index("--credentials-dir") + 1] == children.BROKER_CREDENTIALS_DIR
    selector = first["spec"]["selector"]["matchLabels"]
    assert selector.items() <= first["spec"]["template"]["metadata"]["labels"].items()


def test_a_changed_sensor_type_or_fleet_spec_rolls_the_worker() -> None:
    tighter = {**TYPE_SPEC, "payloadSchema": {"type": "object", "required": ["pressure"]}}
    assert children.deployment_drifted(deployment(type_spec=tighter), deployment())
    assert children.deployment_drifted(deployment(fleet(windowSeconds=60)), deployment())


def test_each_fleet_gets_an_account_without_api_rights_and_its_own_credentials() -> None:
    account = children.desired_ingest_service_account(fleet())
    assert (account["kind"], account["metadata"]["name"]) == ("ServiceAccount", "pudong-pressure-ingest")
    assert account["automountServiceAccountToken"] is False
    data = {"username": "cHVkb25n", "password": "c2VjcmV0"}
    secret = children.desired_fleet_secret(fleet(), children.ingest_secret_name("pudong-pressure"), data)
    service = children.desired_ingest_service(fleet())
    for child in (account, secret, service):
        meta = child["metadata"]
        assert meta["namespace"] == "city"
        assert meta["labels"]["citynerve.io/sensorfleet"] == "pudong-pressure"
        owner = meta["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
            "SensorFleet", "pudong-pressure", "uid-1", True)
    assert (secret["metadata"]["name"], secret["data"]) == ("pudong-pressure-ingest-broker", data)
    assert children.mqtt_secret_name("pudong-pressure") == "pudong-pressure-mqtt"
    assert service["spec"]["selector"] == deployment()["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["port"] == children.INGEST_PORT


def test_a_child_in_line_needs_no_patch_and_a_drifted_one_only_what_differs() -> None:
    service = children.desired_ingest_service(fleet())
    observed = copy.deepcopy(service)
    observed["metadata"] |= {"resourceVersion": "9", "uid": "r-1"}
    observed["metadata"]["labels"]["team"] = "water"  # another's label is kept
    observed["spec"]["clusterIP"] = "10.0.0.7"  # the API server's default
    assert children.child_patch(service, observed) is None
    observed["spec"]["selector"] = {"app": "other"}
    assert children.child_patch(service, observed) == {"spec": service["spec"]}


def test_a_child_of_someone_else_is_left_alone() -> None:
    service = children.desired_ingest_service(fleet())
    foreign = copy.deepcopy(service)
    foreign["metadata"]["ownerReferences"] = [{"kind": "SensorFleet", "name": "old", "uid": "uid-0",
                                               "controller": True}]
    conflict = children.child_conflict(service, foreign)
    assert conflict is not None
    assert "Service pudong-pressure-ingest" in conflict
    assert "SensorFleet old" in conflict
    assert children.child_conflict(service, copy.deepcopy(service)) is None


def test_long_names_stay_dns_labels() -> None:
    name = "x" * 60
    built = deployment(fleet(name))["metadata"]["name"]
    assert len(built) <= 63
    assert built.endswith("-ingest")


def test_drift_ignores_server_defaults_but_not_changes() -> None:
    desired = deployment()
    observed = copy.deepcopy(desired)
    observed["spec"]["progressDeadlineSeconds"] = 600  # defaulted by the API server
    observed["metadata"]["resourceVersion"] = "7"
    assert not children.deployment_drifted(desired, observed)
    observed["spec"]["replicas"] = 5
    assert children.deployment_drifted(desired, observed)
    observed = copy.deepcopy(desired)
    observed["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "EXTRA", "value": "1"})
    assert children.deployment_drifted(desired, observed)
    changed = deployment(fleet(count=10))
    assert children.deployment_drifted(changed, desired)


def test_workload_revision_follows_spec_and_resolved_models() -> None:
    fleets = {"pudong-pressure": fleet()}
    base = children.scenario_payload(scenario(), fleets, MODELS, "shanghai")
    assert base["models"][0]["version"] == "2"
    assert children.workload_revision(base) == children.workload_revision(
        children.scenario_payload(scenario(), fleets, MODELS, "shanghai")
    )
    more = children.scenario_payload(scenario(replicas=3), fleets, MODELS, "shanghai")
    moved = copy.deepcopy(MODELS)
    moved["burst-detector"]["status"]["resolvedVersion"] = "3"
    promoted = children.scenario_payload(scenario(), fleets, moved, "shanghai")
    revisions = {children.workload_revision(p) for p in (base, more, promoted)}
    assert len(revisions) == 3


def test_rayjob_carries_payload_replicas_and_owner() -> None:
    payload = children.scenario_payload(
        scenario(replicas=3), {"pudong-pressure": fleet()}, MODELS, "shanghai"
    )
    job = children.desired_rayjob(scenario(replicas=3), payload, OPTIONS)
    revision = children.workload_revision(payload)
    assert job["metadata"]["name"] == f"burst-drill-{revision[:8]}"
    assert job["metadata"]["labels"][children.LABEL_REVISION] == revision
    assert job["metadata"]["ownerReferences"][0]["kind"] == "Scenario"
    assert job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 3
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    env_line = job["spec"]["runtimeEnvYAML"].split("CITYNERVE_SCENARIO: ", 1)[1]
    assert json.loads(json.loads(env_line)) == payload


def test_a_replace_keeps_what_other_controllers_put_in_the_metadata() -> None:
    live = scenario(mode="live")
    payload = children.scenario_payload(live, {"pudong-pressure": fleet()}, MODELS, "shanghai")
    job = children.desired_rayjob(live, payload, OPTIONS)
    # KubeRay drops a false shutdownAfterJobFinishes; stating it would be drift on every pass.
    assert "shutdownAfterJobFinishes" not in job["spec"]
    metadata = {**job["metadata"], "resourceVersion": "42", "finalizers": ["ray.io/rayjob-finalizer"],
                "annotations": {"ray.io/note": "kept"},
                "labels": {**job["metadata"]["labels"], "team": "ops"}}
    observed = {**job, "spec": {**job["spec"], "entrypointNumCpus": 1}, "metadata": metadata}
    body = children.replacement(job, observed)
    assert body["spec"] == job["spec"]
    assert body["metadata"]["resourceVersion"] == "42"
    assert body["metadata"]["finalizers"] == ["ray.io/rayjob-finalizer"]
    assert body["metadata"]["annotations"]["ray.io/note"] == "kept"
    assert body["metadata"]["labels"] == {**job["metadata"]["labels"], "team": "ops"}
    assert body["metadata"]["ownerReferences"] == job["metadata"]["ownerReferences"]


PRESSURE_FLEETS = [
    {"fleet": "pudong-pressure", "sensorType": "pipe-pressure-gauge", "count": 4200},
    {"fleet": "pudong-flow", "sensorType": "electromagnetic-flow-meter", "count": 310},
]
THRESHOLDS = [
    {"metric": "pressureDropKpa", "unitCode": "KPA", "warning": 50, "alarm": 120},
    {"metric": "flowSurgePercent", "unitCode": "P1", "warning": 20, "alarm": 45},
]


def burst_event(drop_kpa: float, surge_percent: float | None = None, **location: Any) -> dict[str, Any]:
    """A water-burst detection as the runner hands it on (``IncidentEvent.to_dict()``)."""
    measurements = [
        Measurement("pressureDropKpa", "KPA", drop_kpa, "pressure", "145", 6),
        Measurement("pressureDropKpa", "KPA", drop_kpa / 2, "pressure", "159", 3),
    ]
    if surge_percent is not None:
        measurements.append(Measurement("flowSurgePercent", "P1", surge_percent, "flow"))
    return IncidentEvent(
        kind="water-burst",
        location=IncidentLocation(asset_id="125", **location),
        severity="warning",
        detected_at_s=38700.0,
        onset_s=36000.0,
        evidence={"cusum": 16.0, "threshold": 12.0},
        measurements=tuple(measurements),
        rule="the CUSUM reached 16.0, past the detector's threshold 12",
        truth=DrillTruth(true_asset="123", distance_m=740.6, hops=2),
    ).to_dict()


def burst_payload(thresholds: list[dict[str, Any]] = THRESHOLDS, city: str = "shanghai") -> dict[str, Any]:
    payload = children.scenario_payload(
        scenario(thresholds=thresholds), {"pudong-pressure": fleet()}, MODELS, city)
    return {**payload, "fleets": PRESSURE_FLEETS}


PLACED: dict[str, Any] = {
    "lat": 31.250795, "lon": 121.469359, "placement": "Drill placement: junction 125 of Net3."}


def test_incident_manifest_is_a_valid_incident_with_a_stable_name() -> None:
    payload = burst_payload()
    event = burst_event(147.1, 30.0, **PLACED)
    when = datetime(2026, 7, 12, 4, 15, tzinfo=UTC)
    manifest = children.incident_manifest(event, payload, when, OPTIONS.centre)
    incident = from_manifest("Incident", manifest)
    assert incident.spec.drill is True  # type: ignore[attr-defined]
    assert manifest["spec"]["severity"] == "alarm"  # 147 kPa is past the 120 kPa alarm
    evidence = {(e["metric"], e.get("terminal")): (e["fleet"], e["value"], e["unitCode"])
                for e in manifest["spec"]["evidence"]}
    assert evidence == {
        ("simulatedMinute", None): ("pudong-pressure", "645", "MIN"),  # 38700 s
        ("detectionDelayMinutes", None): ("pudong-pressure", "45", "MIN"),  # 2700 s after onset
        ("drillDistanceMetres", None): ("pudong-pressure", "741", "MTR"),
        ("drillDistanceHops", None): ("pudong-pressure", "2", "C62"),
        ("pressureDropKpa", "pudong-pressure-6"): ("pudong-pressure", "147.1", "KPA"),
        ("pressureDropKpa", "pudong-pressure-3"): ("pudong-pressure", "73.55", "KPA"),
        ("flowSurgePercent", None): ("pudong-flow", "30", "P1"),
    }
    location = manifest["spec"]["location"]
    assert (location["latitude"], location["longitude"]) == ("31.250795", "121.469359")
    assert location["assetId"] == "125"
    assert location["description"].startswith("Drill placement: junction 125 of Net3.")
    assert "pudong-pressure-6 (junction 145)" in location["description"]
    note = manifest["spec"]["transitions"][0]["note"]
    assert "pressureDropKpa 147.1 KPA reached the alarm level 120" in note
    assert "flowSurgePercent 30 P1 reached the warning level 20" in note
    assert ("the burst was at junction 123: the reported junction 125 is 741 m along the pipes from it "
            "(2 pipes)") in note
    again = children.incident_manifest(event, payload, datetime.now(UTC), OPTIONS.centre)
    assert again["metadata"]["name"] == manifest["metadata"]["name"]
    other = children.incident_manifest({**event, "detected_at_s": 39600.0}, payload, when, OPTIONS.centre)
    assert other["metadata"]["name"] != manifest["metadata"]["name"]


@pytest.mark.parametrize(
    ("drop_kpa", "surge", "severity", "said"),
    [
        (19.3, None, None, "Not raised: below the Scenario's thresholds: pressureDropKpa 19.3 KPA is below "
                           "the warning level 50."),
        (19.3, 44.7, "warning", "flowSurgePercent 44.7 P1 reached the warning level 20; pressureDropKpa "
                                "19.3 KPA is below the warning level 50."),
        (50.0, None, "warning", "pressureDropKpa 50 KPA reached the warning level 50."),
        (119.9, 45.0, "alarm", "flowSurgePercent 45 P1 reached the alarm level 45; pressureDropKpa 119.9 KPA "
                               "reached the warning level 50."),
    ],
)
def test_severity_follows_the_scenarios_thresholds_in_its_units(
    drop_kpa: float, surge: float | None, severity: str | None, said: str
) -> None:
    decision = children.incident_severity(burst_event(drop_kpa, surge), THRESHOLDS)
    assert decision.severity == severity
    assert decision.reason.endswith(said)


def test_a_below_threshold_detection_is_no_incident() -> None:
    with pytest.raises(ValueError, match="not an Incident: Not raised: below the Scenario's thresholds"):
        children.incident_manifest(burst_event(19.3, **PLACED), burst_payload(), datetime.now(UTC),
                                   OPTIONS.centre)


def test_a_forecast_is_held_to_its_metrics_threshold() -> None:
    event = IncidentEvent(
        kind="urban-flood", location=IncidentLocation("10"), severity="warning", detected_at_s=8700.0,
        measurements=(Measurement("waterLevelMm", "MMT", 103.5, "waterLevel", "10", 1),
                      Measurement("forecastWaterLevelMm", "MMT", 352.4, "waterLevel", "10", 1)),
    ).to_dict()
    levels = [{"metric": "waterLevelMm", "unitCode": "MMT", "warning": 150, "alarm": 270}]
    decision = children.incident_severity(event, levels)
    assert decision.severity == "alarm"
    assert "forecastWaterLevelMm 352.4 MMT reached the alarm level 270" in decision.reason


def test_without_an_applicable_threshold_the_detectors_own_rule_is_named() -> None:
    in_centimetres = [{"metric": "pressureDropKpa", "unitCode": "CMT", "warning": 5, "alarm": 12}]
    for thresholds, unapplied in (([], ""), (in_centimetres, " (pressureDropKpa is measured in KPA, not the "
                                                            "threshold's CMT)")):
        decision = children.incident_severity(burst_event(19.3), thresholds)
        assert decision.severity == "warning"
        assert decision.reason == (
            "Severity warning by the detector's own rule, as no threshold of the Scenario applies to what it "
            f"measured{unapplied}: the CUSUM reached 16.0, past the detector's threshold 12.")
    # a detector that reports no measurements keeps its severity when no threshold names its figures
    crowd = {"kind": "major-event", "severity": "critical", "evidence": {"count": 900.0}}
    assert children.incident_severity(crowd, THRESHOLDS).severity == "critical"
    # ... and its scalar evidence is held to a threshold that names it
    assert children.incident_severity(
        crowd, [{"metric": "count", "unitCode": "C62", "warning": 1000, "alarm": 2000}]).severity is None


def test_terminal_ids_are_the_fleets_gateway_ids() -> None:
    gauge = SensorType.from_resource(
        "pipe-pressure-gauge",
        yaml.safe_load((SAMPLES / "sensortypes" / "pipe-pressure-gauge.yaml").read_text())["spec"])
    batch = json.loads(gateway_batch(gauge, 8, 0, np.random.default_rng(0), prefix="pudong-pressure-"))
    assert [e["id"] for e in batch] == [
        f"urn:ngsi-ld:{gauge.data_model}:{children.terminal_id('pudong-pressure', i)}" for i in range(8)]
    assert children.fleet_measuring("flow", PRESSURE_FLEETS) == PRESSURE_FLEETS[1]
    assert children.fleet_measuring("pressure", PRESSURE_FLEETS) == PRESSURE_FLEETS[0]
    # no fleet of the scenario measures rainfall: its first fleet stands for the scenario
    assert children.fleet_measuring("rainfallIntensity", PRESSURE_FLEETS) == PRESSURE_FLEETS[0]
    small = [{"fleet": "tiny", "sensorType": "pipe-pressure-gauge", "count": 4}]
    entries, terminals = children.incident_evidence(burst_event(60.0), small, "tiny", "2026-07-12T04:15:00Z")
    assert [e["terminal"] for e in entries] == ["tiny-2", "tiny-3"]  # sensors 6 and 3 of a 4-terminal fleet
    assert terminals == ["tiny-2 (junction 145)", "tiny-3 (junction 159)"]


def test_coordinates_are_the_assets_or_the_city_centre_never_zero() -> None:
    payload = burst_payload()
    when = datetime(2026, 7, 12, 4, 15, tzinfo=UTC)
    # a drill's raw model coordinates are not the city's: without a placement the centre is used, and said
    raw = children.incident_manifest(burst_event(147.1, lat=25.64, lon=24.59), payload, when, OPTIONS.centre)
    where = raw["spec"]["location"]
    assert (where["latitude"], where["longitude"]) == ("31.2304", "121.4737")
    assert "city centre" in where["description"]
    live = {**payload, "spec": {**payload["spec"], "mode": "live"}}
    surveyed = children.incident_manifest(burst_event(147.1, lat=31.1, lon=121.5), live, when, OPTIONS.centre)
    where = surveyed["spec"]["location"]
    assert (where["latitude"], where["longitude"]) == ("31.1", "121.5")
    nowhere = burst_payload(city="atlantis")
    assert CityOptions(city="atlantis").centre is None
    with pytest.raises(children.IncidentLocationUnknownError, match="city 'atlantis' has no known centre"):
        children.incident_manifest(burst_event(147.1), nowhere, when, CityOptions(city="atlantis").centre)
    placed = children.incident_manifest(burst_event(147.1, **PLACED), nowhere, when, None)
    assert placed["spec"]["location"]["latitude"] == "31.250795"


def test_flood_warnings_say_whether_the_node_flooded_and_the_lead_time() -> None:
    payload = {**burst_payload([]), "spec": {**burst_payload([])["spec"], "kind": "urban-flood"}}
    when = datetime(2026, 7, 12, 4, 15, tzinfo=UTC)

    def warned(truth: DrillTruth) -> dict[str, Any]:
        event = IncidentEvent(kind="urban-flood", location=IncidentLocation("21", **PLACED),
                              severity="warning", detected_at_s=8700.0, truth=truth).to_dict()
        return children.incident_manifest(event, payload, when, OPTIONS.centre)["spec"]

    dry = warned(DrillTruth(true_asset="21", flooded=False))
    assert {e["metric"]: e["value"] for e in dry["evidence"]}["drillFlooded"] == "0"
    assert "drillLeadTimeMinutes" not in {e["metric"] for e in dry["evidence"]}
    assert dry["transitions"][0]["note"].endswith("In the drill node 21 did not flood.")
    wet = warned(DrillTruth(true_asset="21", flooded=True, flood_onset_s=9600.0, lead_time_s=900.0))
    evidence = {e["metric"]: e["value"] for e in wet["evidence"]}
    assert (evidence["drillFlooded"], evidence["drillLeadTimeMinutes"]) == ("1", "15")
    assert wet["transitions"][0]["note"].endswith(
        "In the drill node 21 flooded at simulated minute 160: the warning came 15 min ahead.")


def test_local_actor_names_round_trip() -> None:
    name = children.local_actor_name("shanghai", "city", "burst-drill", "abc")
    assert children.parse_local_actor_name(name) == ("shanghai", "city", "burst-drill", "abc")
    assert children.parse_local_actor_name("unrelated") is None


@pytest.mark.timeout(60)  # imports the simulators (WNTR, SciPy)
def test_runner_spec_translates_the_scenario_for_the_runner() -> None:
    from citynerve.operators.city.analytics import runner_spec  # noqa: PLC0415
    from citynerve.workloads.sim.water import LeakSpec  # noqa: PLC0415

    payload = children.scenario_payload(scenario(), {"pudong-pressure": fleet()}, MODELS, "shanghai")
    spec = runner_spec(payload)
    assert (spec["kind"], spec["mode"], spec["thresholds"]) == ("water-burst", "drill", {})
    assert spec["simulation"]["network"] == "Net1"
    # the drill's network is placed at the city's centre, from the platform's one table
    assert spec["simulation"]["anchor"] == {"latitude": 31.2304, "longitude": 121.4737,
                                            "name": "the centre of Shanghai"}
    (leak,) = spec["simulation"]["leaks"]
    assert LeakSpec(**leak).node == "22"
    assert spec["models"] == [
        {"name": "burst-detector", "role": "detector", "modelUri": "models:/water-burst-detector/2"}
    ]
    flood = runner_spec(
        {
            **payload,
            "spec": {
                **payload["spec"],
                "kind": "urban-flood",
                "simulation": {"engine": "swmm", "network": "x"},
            },
        }
    )
    assert flood["simulation"] == {"anchor": spec["simulation"]["anchor"]}
    mountain = runner_spec({**payload, "spec": {**payload["spec"], "kind": "mountain-flood", "thresholds": [
        {"metric": "forecastDischargePercent", "unitCode": "P1", "warning": 130, "alarm": 200}]}})
    assert (mountain["simulation"]["warnFactor"], mountain["simulation"]["evacuateFactor"]) == (1.3, 2.0)
    with pytest.raises(ValueError, match="city 'atlantis' has no known centre"):
        runner_spec({**payload, "city": "atlantis"})


def test_a_major_event_drill_names_its_surge() -> None:
    from citynerve.operators.city.analytics import runner_spec  # noqa: PLC0415

    payload = {"spec": {"kind": "major-event", "mode": "drill", "simulation": {"event": "surge:2.5"}},
               "fleets": [], "models": []}
    assert runner_spec(payload)["simulation"] == {"surge": {"peakFactor": 2.5}}
    payload["spec"]["simulation"] = {}
    assert runner_spec(payload)["simulation"] == {}
