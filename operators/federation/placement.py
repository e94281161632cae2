"""What the hub asks each city to run: pure functions, no cluster.

The hub writes a city's work into the city's own hub namespace (``city-<name>``) as one
ConfigMap per object ("work"), carrying the rendered manifest. The city's agent is the only
reader; it applies the manifests in the city and reports back. A ConfigMap rather than a
kind of our own keeps the city's hub credential to the one core resource it can already be
granted narrowly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from citynerve.operators.api.hub import FederatedScenarioSpec, ScenarioOverride
from citynerve.operators.api.resources import kind_info

WORK_LABEL = "citynerve.io/work"
WORK_KIND_LABEL = "citynerve.io/work-kind"
WORK_SOURCE_ANNOTATION = "citynerve.io/work-source"
WORK_HASH_ANNOTATION = "citynerve.io/work-hash"
PROPAGATED_LABEL = "citynerve.io/propagated-from"
MANIFEST_KEY = "manifest.json"
REPORT_CONFIGMAP = "agent-report"
AGENT_LEASE = "agent"


def city_namespace(city: str) -> str:
    """The hub namespace that holds a city's work, Lease and report."""
    return f"city-{city}"


def is_joined(city: Mapping[str, Any]) -> bool:
    """Joined: approved by the hub admin (propagation waits for it)."""
    return bool(city.get("spec", {}).get("approved"))


OFFBOARDED_REASON = "Offboarded"


def is_offboarded(city: Mapping[str, Any]) -> bool:
    """Its agent reported that the city chart was uninstalled (the hub's Joined condition says so)."""
    return any(c.get("type") == "Joined" and c.get("reason") == OFFBOARDED_REASON
               for c in (city.get("status") or {}).get("conditions") or [])


def takes_work(city: Mapping[str, Any]) -> bool:
    return is_joined(city) and not is_offboarded(city)


def placed_cities(spec: Mapping[str, Any], cities: Iterable[Mapping[str, Any]]) -> list[str]:
    """Joined cities a FederatedScenario's placement selects (label selector OR explicit list)."""
    fs = FederatedScenarioSpec.model_validate(spec)
    explicit = set(fs.placement.cities)
    chosen = []
    for city in cities:
        meta = city.get("metadata", {})
        name = meta.get("name", "")
        if not takes_work(city):
            continue
        selector = fs.placement.city_selector
        by_label = selector is not None and selector.matches(dict(meta.get("labels") or {}))
        if name in explicit or by_label:
            chosen.append(name)
    return sorted(chosen)


def unselected_overrides(spec: Mapping[str, Any], cities: Iterable[Mapping[str, Any]]) -> list[str]:
    """Cities a FederatedScenario has an override for that its placement never selects.

    A city is selected when it is listed, or when a City of that name matches the selector
    (joined or not: one waiting for approval will be). The API server already refuses an
    override outside an explicit list; only a selector needs the hub's view of the Cities.
    """
    fs = FederatedScenarioSpec.model_validate(spec)
    selector = fs.placement.city_selector
    matching = {
        str(meta.get("name", ""))
        for city in cities
        for meta in [city.get("metadata", {})]
        if selector is not None and selector.matches(dict(meta.get("labels") or {}))
    }
    chosen = matching | set(fs.placement.cities)
    return sorted(o.city for o in fs.overrides if o.city not in chosen)


def _override_for(overrides: Iterable[ScenarioOverride], city: str) -> ScenarioOverride | None:
    return next((o for o in overrides if o.city == city), None)


def render_scenario(name: str, spec: Mapping[str, Any], city: str) -> dict[str, Any]:
    """The Scenario a FederatedScenario asks ``city`` to run, with that city's overrides."""
    fs = FederatedScenarioSpec.model_validate(spec)
    scenario = fs.template.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    override = _override_for(fs.overrides, city)
    if override is not None:
        changes = override.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"city"})
        scenario.update(changes)
    info = kind_info("Scenario")
    return {
        "apiVersion": f"{info.group}/{info.version}",
        "kind": "Scenario",
        "metadata": {"name": name, "labels": dict(fs.template.labels)},
        "spec": scenario,
    }


def render_sensor_type(body: Mapping[str, Any]) -> dict[str, Any]:
    """A SensorType as the city gets it: the hub's spec and labels, nothing hub-specific."""
    meta = body.get("metadata", {})
    return {
        "apiVersion": body.get("apiVersion", "citynerve.io/v1alpha1"),
        "kind": "SensorType",
        "metadata": {"name": meta["name"], "labels": dict(meta.get("labels") or {})},
        "spec": dict(body["spec"]),
    }


def work_name(kind: str, name: str) -> str:
    return f"{kind.lower()}-{name}"


def manifest_hash(manifest: Mapping[str, Any]) -> str:
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def work_configmap(city: str, source: str, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The ConfigMap that carries one manifest to a city; ``source`` names the hub object."""
    kind = str(manifest["kind"])
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": work_name(kind, manifest["metadata"]["name"]),
            "namespace": city_namespace(city),
            "labels": {WORK_LABEL: "true", WORK_KIND_LABEL: kind.lower()},
            "annotations": {WORK_SOURCE_ANNOTATION: source, WORK_HASH_ANNOTATION: manifest_hash(manifest)},
        },
        "data": {MANIFEST_KEY: json.dumps(manifest, sort_keys=True)},
    }


def desired_work(
    city: Mapping[str, Any],
    sensor_types: Iterable[Mapping[str, Any]],
    federated_scenarios: Iterable[Mapping[str, Any]],
    cities: Iterable[Mapping[str, Any]],
    pinned_models: Iterable[tuple[str, Mapping[str, Any]]] = (),
) -> dict[str, dict[str, Any]]:
    """Every work ConfigMap one city should hold, by ConfigMap name. Empty unless joined (and not offboarded).

    ``pinned_models`` are (source, AnalyticsModel manifest) pairs that model promotions ask this
    city to hold (``citynerve.operators.hub.promotion.city_pins``); they travel as work too.
    """
    name = city["metadata"]["name"]
    if not takes_work(city):
        return {}
    work: dict[str, dict[str, Any]] = {}
    for st in sensor_types:
        cm = work_configmap(name, f"SensorType/{st['metadata']['name']}", render_sensor_type(st))
        work[cm["metadata"]["name"]] = cm
    all_cities = list(cities)
    for fs in federated_scenarios:
        fs_name = fs["metadata"]["name"]
        if name in placed_cities(fs["spec"], all_cities):
            manifest = render_scenario(fs_name, fs["spec"], name)
            cm = work_configmap(name, f"FederatedScenario/{fs_name}", manifest)
            work[cm["metadata"]["name"]] = cm
    # --- model promotion pins (models engineer): an AnalyticsModel per promoted model --------
    for source, pinned in pinned_models:
        cm = work_configmap(name, source, pinned)
        work[cm["metadata"]["name"]] = cm
    return work


def work_changes(
    desired: Mapping[str, Mapping[str, Any]], observed: Mapping[str, Mapping[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """(to create, to update, names to delete) so that ``observed`` becomes ``desired``.

    Only differences count: a city whose work is current costs no write.
    """
    create = [dict(cm) for n, cm in desired.items() if n not in observed]
    update = [
        dict(cm) for n, cm in desired.items()
        if n in observed and _hash_of(observed[n]) != _hash_of(cm)
    ]
    delete = sorted(n for n in observed if n not in desired)
    return create, update, delete


def _hash_of(cm: Mapping[str, Any]) -> str | None:
    annotations = cm.get("metadata", {}).get("annotations") or {}
    value = annotations.get(WORK_HASH_ANNOTATION)
    return str(value) if value is not None else None


def manifest_of(cm: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest a work ConfigMap carries; ValueError if it is not one."""
    try:
        manifest: dict[str, Any] = json.loads(cm["data"][MANIFEST_KEY])
    except (KeyError, TypeError, ValueError) as exc:
        name = cm.get("metadata", {}).get("name")
        msg = f"work ConfigMap {name!r} has no valid {MANIFEST_KEY}"
        raise ValueError(msg) from exc
    return manifest
