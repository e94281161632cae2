"""`citynerve models promote`: gates, selectors, the checks before it creates anything, and the
ModelPromotion it creates (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest
from citynerve.models.registry import ModelVersionRecord
from citynerve.operators.cli import build_parser
from citynerve.operators.hub.promotion import REQUESTED_BY_ANNOTATION
from citynerve.operators.models_cli import parse_gate, parse_selector, promotion_manifest, promotion_refusal


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("detectionRate>=0.7", ("detectionRate", "GreaterThanOrEqual", "0.7")),
        ("falseAlarmsPerDay < 0.5", ("falseAlarmsPerDay", "LessThan", "0.5")),
        ("soakIncidents<=2", ("soakIncidents", "LessThanOrEqual", "2")),
        ("detectionDelaySeconds>-1", ("detectionDelaySeconds", "GreaterThan", "-1")),
    ],
)
def test_gates_parse(text: str, expected: tuple[str, str, str]) -> None:
    gate = parse_gate(text)
    assert (gate["metric"], gate["operator"], gate["threshold"]) == expected


@pytest.mark.timeout(10)
@pytest.mark.parametrize("text", ["detectionRate=>0.7", "DetectionRate>=1", "rate>=abc", "rate"])
def test_bad_gates_are_refused_with_the_expected_form(text: str) -> None:
    with pytest.raises(ValueError, match="<camelCaseMetric><op><number>"):
        parse_gate(text)


@pytest.mark.timeout(10)
def test_selectors_parse_like_kubectl() -> None:
    assert parse_selector("") == {}
    assert parse_selector("region=east") == {"matchLabels": {"region": "east"}}
    assert parse_selector("region in (east, west),tier!=edge,!legacy") == {
        "matchExpressions": [
            {"key": "region", "operator": "In", "values": ["east", "west"]},
            {"key": "tier", "operator": "NotIn", "values": ["edge"]},
            {"key": "legacy", "operator": "DoesNotExist"},
        ]
    }


@pytest.mark.timeout(10)
def test_promote_builds_a_valid_modelpromotion() -> None:
    args = build_parser().parse_args(
        [
            "models",
            "promote",
            "water-burst-detector",
            "--version",
            "3",
            "--cities",
            "region=east",
            "--canary",
            "shanghai",
            "--gate",
            "detectionRate>=0.5",
            "--gate",
            "soakIncidents<=2",
            "--soak",
            "5",
        ]
    )
    manifest = promotion_manifest(
        args.name,
        version=args.version,
        from_alias=args.from_alias,
        alias=args.alias,
        cities=args.cities,
        canary=args.canary,
        gates=args.gate,
        soak_seconds=args.soak,
        max_failed_cities=args.max_failed_cities,
        timeout_seconds=args.timeout,
        name=None,
        namespace=args.namespace,
        actor="alice",
    )
    assert manifest["metadata"]["generateName"] == "water-burst-detector-v3-to-champion-"
    assert manifest["metadata"]["annotations"] == {REQUESTED_BY_ANNOTATION: "alice"}
    spec = manifest["spec"]
    assert spec["source"] == {"version": "3"}
    assert spec["canaryCity"] == "shanghai"
    assert spec["citySelector"] == {"matchLabels": {"region": "east"}}
    assert [g["metric"] for g in spec["gates"]] == ["detectionRate", "soakIncidents"]
    assert spec["soakSeconds"] == 5


@pytest.mark.timeout(10)
def test_promoting_an_alias_to_itself_is_refused_before_the_hub_sees_it() -> None:
    with pytest.raises(ValueError, match="same alias"):
        promotion_manifest(
            "m",
            version=None,
            from_alias="champion",
            alias="champion",
            cities="",
            canary=None,
            gates=[],
            soak_seconds=0,
            max_failed_cities=0,
            timeout_seconds=600,
            name="p",
            namespace="n",
            actor="a",
        )


@pytest.mark.timeout(10)
def test_promote_exits_1_with_a_message_on_a_bad_gate(capsys: pytest.CaptureFixture[str]) -> None:
    from citynerve.operators.cli import main  # noqa: PLC0415

    code = main(
        ["models", "promote", "m", "--version", "1", "--gate", "rate=>1", "--kubeconfig", "/nonexistent"]
    )
    assert code == 1
    assert "error:" in capsys.readouterr().err


def _manifest(**overrides: object) -> dict[str, object]:
    options: dict[str, object] = {
        "version": "3", "from_alias": None, "alias": "champion", "cities": "", "canary": "shanghai",
        "gates": ["detectionRate>=0.5", "soakIncidents<=2"], "soak_seconds": 5, "max_failed_cities": 0,
        "timeout_seconds": 600, "name": "p", "namespace": "n", "actor": "a",
    }
    options.update(overrides)
    return promotion_manifest("water-burst-detector", **options)  # type: ignore[arg-type]


CITIES = [
    {"metadata": {"name": "shanghai", "labels": {"region": "east"}}, "spec": {"approved": True}},
    {"metadata": {"name": "chengdu", "labels": {"region": "west"}}, "spec": {"approved": True}},
]
RECORD = ModelVersionRecord("water-burst-detector", "3", "sha256:" + "a" * 64, "run",
                            {"detectionRate": 0.75, "falseAlarmsPerDay": 0.0})


@pytest.mark.timeout(10)
def test_a_promotion_the_hub_would_refuse_for_its_input_is_refused_before_it_is_created() -> None:
    assert promotion_refusal(_manifest(), CITIES, RECORD) is None  # soakIncidents is observed in cities
    assert promotion_refusal(_manifest(), CITIES, None) is None
    assert promotion_refusal(_manifest(cities="region=north"), None, RECORD) is None  # Cities not readable
    canary = promotion_refusal(_manifest(cities="region=west"), CITIES, RECORD)
    assert canary == (
        "The promotion of water-burst-detector is refused: canary city shanghai is not among the selected "
        "cities (chengdu); select it with spec.citySelector or choose a selected city as spec.canaryCity."
    )
    nobody = promotion_refusal(_manifest(cities="region=north", canary=None), CITIES, RECORD)
    assert nobody == (
        "The promotion of water-burst-detector is refused: the city selector picks no joined city."
    )
    unknown = promotion_refusal(_manifest(gates=["f1Permille>=800"]), CITIES, RECORD)
    assert unknown is not None
    assert "its gates name f1Permille, which the version's run does not record" in unknown
    assert "(it records: detectionRate, falseAlarmsPerDay)" in unknown
    assert promotion_refusal(_manifest(gates=["f1Permille>=800"]), None, RECORD) == unknown


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--pressure-fleet", "p"], "only go with --from-history"),
        (["--from-history", "{tmp}"], "needs --pressure-fleet and --supply-fleet"),
        (["--from-history", "{tmp}/absent", "--pressure-fleet", "p", "--supply-fleet", "s"],
         "no such folder"),
    ],
)
def test_training_from_history_refuses_options_it_cannot_honour(
    args: list[str], said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from citynerve.operators.cli import main  # noqa: PLC0415

    options = [a.format(tmp=tmp_path) for a in args]
    argv = ["models", "train", "--tracking-uri", "http://127.0.0.1:9", *options]
    assert main(argv) == 1
    assert said in capsys.readouterr().err
