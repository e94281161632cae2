"""The SensorType catalogue: broad enough, consistent, and in sync with samples/sensortypes/."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from citynerve.operators.api import SensorType, catalogue, from_manifest

SENSORTYPES = Path(__file__).resolve().parents[1] / "samples" / "sensortypes"


@pytest.fixture(scope="module")
def types() -> list[SensorType]:
    return catalogue.load()


@pytest.mark.timeout(30)
def test_samples_sensortypes_match_the_catalogue() -> None:
    """Fails when samples/sensortypes/ differs from the catalogue: run the generator."""
    generated = catalogue.generate()
    on_disk = {p.name: p.read_text(encoding="utf-8") for p in SENSORTYPES.glob("*.yaml")}
    assert sorted(on_disk) == sorted(generated), "run `python -m citynerve.operators.api.catalogue`"
    stale = [name for name, text in generated.items() if on_disk[name] != text]
    assert not stale, f"out of date: {stale}; run `python -m citynerve.operators.api.catalogue`"


@pytest.mark.timeout(30)
def test_check_flag(tmp_path: Path) -> None:
    assert catalogue.main(["--check", "--output-dir", str(tmp_path)]) == 1
    assert catalogue.main(["--output-dir", str(tmp_path)]) == 0
    assert catalogue.main(["--check", "--output-dir", str(tmp_path)]) == 0


@pytest.mark.timeout(30)
def test_at_least_forty_types_cover_every_domain(types: list[SensorType]) -> None:
    assert len(types) >= 40
    domains = {t.spec.domain for t in types}
    assert domains == {
        "water-supply",
        "drainage-flood",
        "environment",
        "traffic",
        "parking",
        "crowd",
        "video-analytics",
        "structural-health",
    }
    measured = {p.name for t in types for p in t.spec.properties}
    for quantity in (
        "pressure",
        "flow",
        "chlorine",
        "turbidity",
        "pH",
        "waterLevel",
        "rainfall",
        "pumpRunning",
        "pm25",
        "noiseLevel",
        "vehicleCount",
        "availableSpots",
        "peopleCount",
        "eventCount",
        "strain",
        "acceleration",
        "tilt",
    ):
        assert quantity in measured, quantity
    per_domain = {d: sum(t.spec.domain == d for t in types) for d in domains}
    assert min(per_domain.values()) >= 3, per_domain


@pytest.mark.timeout(30)
def test_types_are_consistent(types: list[SensorType]) -> None:
    for t in types:
        assert t.spec.payload_schema is not None
        payload_properties = t.spec.payload_schema["properties"]
        for prop in t.spec.properties:
            assert float(prop.minimum) < float(prop.maximum), (t.metadata.name, prop.name)
            assert payload_properties[prop.name]["minimum"] == float(prop.minimum)
        assert t.metadata.labels["citynerve.io/domain"] == t.spec.domain


@pytest.mark.timeout(30)
def test_generated_files_are_valid_sensor_types() -> None:
    for path in SENSORTYPES.glob("*.yaml"):
        manifest = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert from_manifest("SensorType", manifest).metadata.name == path.stem


@pytest.mark.timeout(30)
def test_data_models_are_official_smart_data_models(types: list[SensorType]) -> None:
    """Checked against pysmartdatamodels' offline official list (a dev dependency)."""
    spec = importlib.util.find_spec("pysmartdatamodels")
    assert spec is not None, "pysmartdatamodels is a dev dependency; run make setup"
    assert spec.submodule_search_locations
    official = (
        Path(next(iter(spec.submodule_search_locations))) / "model-assets" / "official_list_data_models.json"
    )
    entries = json.loads(official.read_text(encoding="utf-8"))["officialList"]
    known = {(e["repoName"], model) for e in entries for model in e.get("dataModels", [])}
    for t in types:
        assert (t.spec.data_model.subject, t.spec.data_model.entity_type) in known, t.metadata.name


@pytest.mark.timeout(30)
def test_variants_expand_and_unknown_quantities_are_refused() -> None:
    table: dict[str, Any] = {
        "quantities": {"waterLevel": ["MMT", "0", "20000", "Water level"]},
        "families": [
            {
                "family": "f",
                "domain": "drainage-flood",
                "model": "dataModel.Environment/WaterObserved",
                "interval": 60,
                "types": [
                    {
                        "name": "gauge",
                        "title": "Gauge",
                        "measures": ["waterLevel"],
                        "variants": [
                            {"suffix": "river", "title": "River gauge"},
                            {
                                "suffix": "underpass",
                                "title": "Underpass gauge",
                                "ranges": {"waterLevel": ["0", "3000"]},
                            },
                        ],
                    }
                ],
            }
        ],
    }
    expanded = catalogue.expand(table)
    assert [t.metadata.name for t in expanded] == ["gauge-river", "gauge-underpass"]
    assert expanded[1].spec.properties[0].maximum == "3000"
    table["families"][0]["types"][0]["measures"] = ["depth"]
    with pytest.raises(ValueError, match="unknown quantities"):
        catalogue.expand(table)
