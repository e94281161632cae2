"""Typed CityNerve resources (group citynerve.io, version v1alpha1): the single source of the CRDs."""

from citynerve.operators.api.common import API_VERSION, GROUP, VERSION, Condition, StatusBase
from citynerve.operators.api.resources import (
    KIND_BY_NAME,
    KINDS,
    AnalyticsModel,
    City,
    FederatedScenario,
    Incident,
    KindInfo,
    ModelPromotion,
    Resource,
    Scenario,
    SensorFleet,
    SensorType,
    from_manifest,
    kind_info,
    to_manifest,
)

__all__ = [
    "API_VERSION",
    "GROUP",
    "KINDS",
    "KIND_BY_NAME",
    "VERSION",
    "AnalyticsModel",
    "City",
    "Condition",
    "FederatedScenario",
    "Incident",
    "KindInfo",
    "ModelPromotion",
    "Resource",
    "Scenario",
    "SensorFleet",
    "SensorType",
    "StatusBase",
    "from_manifest",
    "kind_info",
    "to_manifest",
]
