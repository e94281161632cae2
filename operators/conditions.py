"""Conditions and status patches, as every CityNerve operator reports them (pure functions).

Conditions follow Kubernetes' ``metav1.Condition``: one per type, a CamelCase reason, a
message for a person, ``lastTransitionTime`` that only moves when the status flips, and the
generation it was computed from. Status is computed on a copy and written only when it
differs (``status_patch`` returns ``None`` for a no-op), so a no-op reconcile writes nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal

ConditionStatus = Literal["True", "False", "Unknown"]


def now_rfc3339() -> str:
    """The current time as the API server writes it (second precision, UTC, `Z`)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def sentence(text: str) -> str:
    """``text`` as a sentence for a condition or an Event: a full stop at the end, and the first letter
    capitalised when it starts with a plain word (never a name such as ``water-burst-detector``)."""
    text = text.strip()
    if not text:
        return text
    first = text.split(" ", 1)[0]
    if first.isalpha() and first.islower():
        text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def duration(seconds: int) -> str:
    """Seconds as `kubectl get` shows a duration, largest unit first: ``4s``, ``2m10s``, ``1h2m``, ``3d``.

    The API's DURATION pattern accepts exactly these; zero is ``0s``.
    """
    seconds = max(0, int(seconds))
    parts = []
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def parse_time(value: str | None) -> datetime | None:
    """An RFC 3339 timestamp (as the API server or a client wrote it), or None."""
    if not value:
        return None
    return datetime.fromisoformat(value)


def make_condition(
    condition_type: str, status: ConditionStatus, reason: str, message: str, generation: int | None
) -> dict[str, Any]:
    """A condition without its transition time (``set_conditions`` fills that in)."""
    condition: dict[str, Any] = {
        "type": condition_type,
        "status": status,
        "reason": reason,
        "message": message,
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def set_conditions(
    current: Iterable[Mapping[str, Any]], desired: Iterable[Mapping[str, Any]], now: str
) -> list[dict[str, Any]]:
    """Merge desired conditions into the current ones.

    A condition whose status is unchanged keeps its ``lastTransitionTime``; a new or flipped
    one gets ``now``. Types not in ``desired`` are kept as they are, so two parts of an
    operator may each own some types.
    """
    by_type = {c["type"]: dict(c) for c in current}
    for wanted in desired:
        old = by_type.get(wanted["type"])
        merged = dict(wanted)
        if old is not None and old.get("status") == wanted["status"] and old.get("lastTransitionTime"):
            merged["lastTransitionTime"] = old["lastTransitionTime"]
        else:
            merged["lastTransitionTime"] = now
        by_type[wanted["type"]] = merged
    return sorted(by_type.values(), key=lambda c: str(c["type"]))


def find_condition(status: Mapping[str, Any] | None, condition_type: str) -> dict[str, Any] | None:
    for condition in (status or {}).get("conditions") or []:
        if condition.get("type") == condition_type:
            return dict(condition)
    return None


def is_true(status: Mapping[str, Any] | None, condition_type: str) -> bool:
    condition = find_condition(status, condition_type)
    return bool(condition and condition.get("status") == "True")


def _normalise(value: Any) -> Any:
    """Compare statuses the way they round-trip through the API server (lists of conditions by type)."""
    if isinstance(value, Mapping):
        return {k: _normalise(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        items = [_normalise(v) for v in value]
        if all(isinstance(i, dict) and "type" in i for i in items):
            return sorted(items, key=lambda i: str(i["type"]))
        return items
    return value


def status_patch(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> dict[str, Any] | None:
    """The JSON merge patch turning ``current`` into ``desired`` at the top level, or None if equal.

    Fields of ``current`` missing from ``desired`` are removed (set to ``None``); fields the
    operator does not own must therefore be copied into ``desired`` by the caller.
    """
    current = current or {}
    patch: dict[str, Any] = {}
    for key, value in desired.items():
        if _normalise(current.get(key)) != _normalise(value):
            patch[key] = copy.deepcopy(value)
    for key in current:
        if key not in desired and current[key] is not None:
            patch[key] = None
    return patch or None


def with_conditions(
    current_status: Mapping[str, Any] | None,
    fields: Mapping[str, Any],
    conditions: Iterable[Mapping[str, Any]],
    generation: int | None,
    now: str,
) -> dict[str, Any]:
    """A complete desired status: observed fields, merged conditions and observedGeneration."""
    desired: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}
    desired["conditions"] = set_conditions((current_status or {}).get("conditions") or [], conditions, now)
    if generation is not None:
        desired["observedGeneration"] = generation
    return desired
