"""Shared building blocks of the CityNerve resource models.

Every model here is both a pydantic model (what operators and the CLI use) and the source
of a Kubernetes structural schema (what `crdgen` writes to `crds/`). Cross-field rules are
declared once as `Rule`s: the same rule becomes a CEL `x-kubernetes-validations` entry in the
CRD and, when it has a Python mirror, a pydantic validator, so bad YAML is refused by the API
server and by `from_manifest` with the same message.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    StringConstraints,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

GROUP = "citynerve.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Names, as Kubernetes validates them (DNS-1123 subdomain and label).
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# camelCase identifiers: metric and property names as they appear in NGSI-LD payloads.
CAMEL_IDENTIFIER = r"^[a-z][A-Za-z0-9]*$"
# A decimal number written as a string, so that no float ever enters a spec.
DECIMAL = r"^-?[0-9]+(\.[0-9]+)?$"
# A duration as `kubectl get` shows one: days, hours, minutes and seconds, largest first (`2m10s`).
DURATION = r"^([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?$"
# UN/CEFACT Recommendation 20 common codes, as FIWARE Smart Data Models use them.
UNIT_CODE = r"^[A-Z0-9]{2,3}$"
# A City's name: a DNS label short enough that its hub namespace `city-<name>` is one too.
CITY_NAME_MAX_LENGTH = 58
# MLflow registered-model names: dot-separated words of letters, digits, `-` and `_`, so that a
# name is never a path (`../x`), a URI or a query, and fits a Kubernetes name once lowercased.
MODEL_NAME = r"^[A-Za-z0-9]([-_A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-_A-Za-z0-9]*[A-Za-z0-9])?)*$"
MODEL_NAME_MAX_LENGTH = 63
# Label keys and values, as the API server checks them on metadata.labels: a key is an optional
# DNS-subdomain prefix of at most 253 characters and `/`, then a name; a value is empty or a name.
_LABEL_NAME = r"[A-Za-z0-9]([-_.A-Za-z0-9]{0,61}[A-Za-z0-9])?"
LABEL_KEY = rf"^({DNS_SUBDOMAIN[1:-1]}/)?{_LABEL_NAME}$"
LABEL_VALUE = rf"^({_LABEL_NAME})?$"
LABEL_KEY_MAX_LENGTH = 253 + 1 + 63
LABELS_MAX = 64
CityName = Annotated[str, StringConstraints(pattern=DNS_LABEL, min_length=1, max_length=CITY_NAME_MAX_LENGTH)]
LABEL_KEY_MESSAGE = (
    "label keys are a name of at most 63 letters, digits, '-', '_' or '.' (starting and ending "
    "alphanumeric), optionally after a DNS-subdomain prefix of at most 253 characters and '/', "
    "for example citynerve.io/programme"
)

ConditionStatus = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class Rule:
    """A cross-field rule: a CEL expression for the API server, optionally mirrored in Python.

    `check` receives the validated model and returns True when the rule holds; it is the
    Python reading of `cel` and must agree with it.
    """

    cel: str
    message: str
    field_path: str | None = None
    reason: Literal["FieldValueInvalid", "FieldValueRequired", "FieldValueForbidden"] | None = None
    check: Callable[[Any], bool] | None = None

    def to_validation(self) -> dict[str, str]:
        validation = {"rule": self.cel, "message": self.message}
        if self.field_path:
            validation["fieldPath"] = self.field_path
        if self.reason:
            validation["reason"] = self.reason
        return validation


def immutable(what: str) -> dict[str, Any]:
    """`json_schema_extra` for a field that may be set at creation and never changed."""
    return {
        "x-kubernetes-validations": [
            {"rule": "self == oldSelf", "message": f"{what} is immutable; delete and recreate the object"}
        ]
    }


def list_map(*keys: str) -> dict[str, Any]:
    """`json_schema_extra` for a list of named objects, merged by the API server on `keys`."""
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": list(keys)}


LIST_SET: dict[str, Any] = {"x-kubernetes-list-type": "set"}
LIST_ATOMIC: dict[str, Any] = {"x-kubernetes-list-type": "atomic"}


class CrdModel(BaseModel):
    """Base of every model that is part of a CRD schema: camelCase in YAML, snake_case in Python."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=False,
    )

    rules: ClassVar[tuple[Rule, ...]] = ()

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        target = handler.resolve_ref_schema(json_schema)
        if cls.rules and "x-kubernetes-validations" not in target:
            target["x-kubernetes-validations"] = [rule.to_validation() for rule in cls.rules]
        return json_schema

    @model_validator(mode="after")
    def _check_rules(self) -> CrdModel:
        for name, info in type(self).model_fields.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            items = getattr(self, name)
            if extra.get("x-kubernetes-list-type") in ("map", "set") and items:
                keys = extra.get("x-kubernetes-list-map-keys")
                seen = [
                    tuple(item.model_dump(by_alias=True).get(k) for k in keys)
                    if isinstance(keys, list)
                    else item
                    for item in items
                ]
                duplicates = sorted({str(key) for key in seen if seen.count(key) > 1})
                if duplicates:
                    raise ValueError(f"{info.alias or name}: duplicate entries {', '.join(duplicates)}")
        check_rules(self, type(self).rules)
        return self


def check_rules(obj: BaseModel, rules: tuple[Rule, ...]) -> None:
    """Raise a ValueError naming the field of the first rule whose Python mirror `obj` breaks."""
    for rule in rules:
        if rule.check is not None and not rule.check(obj):
            path = rule.field_path.lstrip(".") if rule.field_path else type(obj).__name__
            raise ValueError(f"{path}: {rule.message}")


class Condition(CrdModel):
    """One aspect of the object's observed state, in the shape of Kubernetes' metav1.Condition."""

    type: str = Field(
        description="Which aspect this condition reports, in CamelCase (for example `Ready`).",
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
        r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
        max_length=316,
    )
    status: ConditionStatus = Field(description="Whether the condition holds: True, False or Unknown.")
    reason: str = Field(
        description="A CamelCase word a program can switch on, explaining the status (for example "
        "`HeartbeatMissed`).",
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        min_length=1,
        max_length=1024,
    )
    message: str = Field(
        default="",
        description="A sentence for a person: what is wrong and what to do about it.",
        max_length=32768,
    )
    last_transition_time: datetime = Field(
        description="When the status last changed (RFC 3339).",
    )
    observed_generation: int | None = Field(
        default=None,
        ge=0,
        description="The metadata.generation of the object this condition was computed from.",
    )


class StatusBase(CrdModel):
    """Fields every CityNerve status carries."""

    observed_generation: int | None = Field(
        default=None,
        ge=0,
        description="The metadata.generation the operator last reconciled; when it is below "
        "metadata.generation the status is stale.",
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=32,
        description="Observed conditions, at most one per type.",
        json_schema_extra=list_map("type"),
    )

    def condition(self, condition_type: str) -> Condition | None:
        """The condition of this type, if the operator has reported it."""
        return next((c for c in self.conditions if c.type == condition_type), None)


class ObjectMeta(BaseModel):
    """The part of Kubernetes object metadata the operators read; everything else is kept as is."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    name: str | None = None
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    generation: int | None = None


class LocalObjectReference(CrdModel):
    """A reference to an object of a known kind in the same namespace."""

    name: str = Field(
        description="Name of the referenced object.", pattern=DNS_SUBDOMAIN, min_length=1, max_length=253
    )


class SecretKeyReference(CrdModel):
    """A key in a Secret in the same namespace."""

    name: str = Field(description="Name of the Secret.", pattern=DNS_SUBDOMAIN, min_length=1, max_length=253)
    key: str = Field(
        description="Key within the Secret's data.",
        pattern=r"^[-._a-zA-Z0-9]+$",
        min_length=1,
        max_length=253,
    )


def label_key_cel(key: str) -> str:
    """CEL that holds when the string expression `key` is a valid label key."""
    return f"{key}.matches(r'{LABEL_KEY}') && {key}.indexOf('/') <= 253"


def is_label_key(key: str) -> bool:
    """The Python reading of `label_key_cel`."""
    return re.fullmatch(LABEL_KEY, key) is not None and key.find("/") <= 253


def _valid_label_keys(labels: dict[str, str]) -> dict[str, str]:
    invalid = sorted(key for key in labels if not is_label_key(key))
    if invalid:
        raise ValueError(f"{LABEL_KEY_MESSAGE}; not valid: {', '.join(map(repr, invalid))}")
    return labels


LabelValue = Annotated[str, StringConstraints(max_length=63, pattern=LABEL_VALUE)]
# A map of labels as Kubernetes accepts them in metadata.labels; declare with `labels_field`.
Labels = Annotated[dict[str, LabelValue], AfterValidator(_valid_label_keys)]


def labels_field(description: str) -> Any:
    """A `Labels` field: at most LABELS_MAX entries, keys checked by CEL (a schema cannot check keys)."""
    return Field(
        default_factory=dict,
        max_length=LABELS_MAX,
        description=f"{description} Keys and values follow Kubernetes label syntax: values are at most 63 "
        "letters, digits, '-', '_' or '.', starting and ending alphanumeric (or empty).",
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": f"self.all(k, {label_key_cel('k')})", "message": LABEL_KEY_MESSAGE}
            ]
        },
    )


class LabelSelectorRequirement(CrdModel):
    """A label key, an operator and values, as in Kubernetes label selectors."""

    key: str = Field(
        description="The label key the requirement applies to (Kubernetes label key syntax).",
        pattern=LABEL_KEY,
        min_length=1,
        max_length=LABEL_KEY_MAX_LENGTH,
    )
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="How the key's value is compared with `values`."
    )
    values: list[LabelValue] = Field(
        default_factory=list,
        max_length=64,
        description="Values to compare with, in label value syntax; non-empty for In and NotIn, empty for "
        "Exists and DoesNotExist.",
        json_schema_extra=LIST_SET,
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.key.indexOf('/') <= 253",
            message="the label key's prefix (before '/') is a DNS subdomain of at most 253 characters",
            field_path=".key",
            check=lambda r: is_label_key(r.key),
        ),
        Rule(
            cel="(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)",
            message="values must be non-empty for operators In and NotIn and empty for Exists and "
            "DoesNotExist",
            field_path=".values",
            check=lambda r: (r.operator in ("In", "NotIn")) == bool(r.values),
        ),
    )


class LabelSelector(CrdModel):
    """Selects objects by their labels; the requirements are ANDed. An empty selector selects all."""

    match_labels: Labels = labels_field("Labels an object must carry with exactly these values.")
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list,
        max_length=32,
        description="Label requirements an object must meet.",
        json_schema_extra=LIST_ATOMIC,
    )

    def matches(self, labels: dict[str, str]) -> bool:
        """Whether an object with these labels is selected."""
        if any(labels.get(key) != value for key, value in self.match_labels.items()):
            return False
        for requirement in self.match_expressions:
            present = requirement.key in labels
            value = labels.get(requirement.key)
            if requirement.operator == "In" and value not in requirement.values:
                return False
            if requirement.operator == "NotIn" and present and value in requirement.values:
                return False
            if requirement.operator == "Exists" and not present:
                return False
            if requirement.operator == "DoesNotExist" and present:
                return False
        return True
