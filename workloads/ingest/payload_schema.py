"""A SensorType's ``payloadSchema`` (JSON Schema, Draft 2020-12), evaluated on every NGSI-LD entity.

The schema is read against the entity's concise form: a normalized Property stands for its
``value``, a Relationship for its ``object``. It is compiled once into column checks that run
on a decoded batch with NumPy/Arrow, for the constructs the catalogue and real schemas use:

* at the top level: ``type: object`` (a decoded entity always is one) and ``required``
  naming ``id``, ``type``, ``dateObserved`` or a measured property;
* under ``properties``, for ``id``, ``type`` and ``dateObserved`` (strings): ``type``,
  ``enum``, ``const``, ``pattern`` (when RE2 accepts it) and ``format: date-time`` (RFC 3339);
* for each measured property (numbers): ``type`` (number, integer, string, boolean, null,
  or a list of them), ``minimum``, ``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum``,
  ``enum`` and ``const``.

Everything else — other top-level keywords (``additionalProperties``, ``allOf``, ``if`` …),
other keywords of those properties (``multipleOf``, ``anyOf`` …), patterns RE2 rejects,
``required`` or ``properties`` naming attributes the decoder does not read — is left in a
residual schema that `jsonschema`'s Draft 2020-12 validator (built once, with the same
date-time check) evaluates per entity; a schema with ``unevaluatedProperties`` goes there
whole. Annotations (``title``, ``description``, ``$comment`` …) are ignored.

Where the answer can differ from evaluating the raw JSON: the decoder's own checks come first
(``id`` and ``type`` must be strings, a measured property a number or null, else the entity
is ``undecodable``); a normalized ``dateObserved`` sent as null reads as absent; a measured
property's value shows in a message as the float it decoded to (``400.0`` for ``400``); and a
``pattern`` runs in RE2, whose syntax RE2 accepts means the same as ECMA-262's for the usual
constructs (classes, anchors, repetition, alternation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no stubs in this environment
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]

#: The string attributes every decoded entity carries (``dateObserved`` may be absent).
STRING_ATTRIBUTES = ("id", "type", "dateObserved")
_ANNOTATIONS = frozenset(
    {
        "$schema",
        "$id",
        "$comment",
        "title",
        "description",
        "examples",
        "default",
        "deprecated",
        "readOnly",
        "writeOnly",
    }
)
_STRING_KEYWORDS = frozenset({"type", "enum", "const", "pattern", "format"})
_NUMBER_KEYWORDS = frozenset(
    {"type", "enum", "const", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
)
_JSON_TYPES = ("array", "boolean", "integer", "null", "number", "object", "string")
_RFC3339 = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$"


@dataclass(frozen=True)
class EntityColumns:
    """One decoded batch's attributes, one entry per entity, in their concise form.

    ``strings`` holds those of ``id``, ``type`` and ``dateObserved`` the checks read
    (`PayloadSchema.strings_read`; null where absent, and where a normalized entity sent
    null); ``numbers`` each measured property (NaN where absent or null), ``absent`` and
    ``null`` where it is.
    """

    size: int
    strings: Mapping[str, pa.Array]
    numbers: Mapping[str, FloatArray]
    absent: Mapping[str, BoolArray]
    null: Mapping[str, BoolArray]


#: One compiled check: a failure mask over the entities, and the message for a failing one.
_Check = Callable[[EntityColumns], tuple[BoolArray, Callable[[int], str]]]


class PayloadSchema:
    """A payload schema compiled once: vectorised checks plus, if needed, a per-entity residual."""

    def __init__(self, schema: Mapping[str, Any], measured: Sequence[str], owner: str) -> None:
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as err:
            raise ValueError(f"{owner}: payloadSchema is not a valid JSON Schema: {err.message}") from err
        self.schema = schema
        self._measured = frozenset(measured)
        self._checks: list[tuple[str, _Check]] = []
        #: the string attributes the compiled checks read (the decoder builds only these)
        self.strings_read: set[str] = set()
        residual = self._compile(dict(schema))
        self._residual = (
            jsonschema.Draft202012Validator(residual, format_checker=_FORMATS) if residual else None
        )

    @property
    def residual(self) -> Mapping[str, Any] | None:
        """What is evaluated per entity with jsonschema; None when everything compiled."""
        return self._residual.schema if self._residual is not None else None

    def violations(self, columns: EntityColumns, concise: Callable[[], Sequence[Any]]) -> dict[int, str]:
        """Entity index → ``<path>: <message>`` for each entity the schema rejects.

        ``concise`` returns the batch's entities as concise JSON values; it is called only
        when a residual schema is left to evaluate.
        """
        first = np.full(columns.size, -1, dtype=np.int64)
        messages: list[Callable[[int], str]] = []
        paths: list[str] = []
        for path, check in self._checks:
            failed, message = check(columns)
            failed &= first < 0
            if failed.any():
                first[failed] = len(messages)
            messages.append(message)
            paths.append(path)
        out = {int(i): f"{paths[first[i]]}: {messages[first[i]](int(i))}" for i in np.flatnonzero(first >= 0)}
        if self._residual is not None:
            validator = self._residual
            for i, entity in enumerate(concise()):
                if i in out:
                    continue
                error = jsonschema.exceptions.best_match(validator.iter_errors(entity))
                if error is not None:
                    out[i] = f"{_path(error.absolute_path)}: {error.message}"
        return out

    # ---- compiling --------------------------------------------------------------------------
    def _compile(self, schema: dict[str, Any]) -> dict[str, Any]:
        """Turn what can be checked on columns into checks; return the rest (empty: nothing)."""
        if "unevaluatedProperties" in schema:
            return schema
        residual: dict[str, Any] = {}
        for keyword, value in schema.items():
            if keyword in _ANNOTATIONS:
                continue
            if keyword == "type" and value == "object":
                continue
            if keyword == "required":
                left = self._compile_required(value)
                if left:
                    residual["required"] = left
            elif keyword == "properties":
                left_props = {
                    name: sub for name, sub in value.items() if not self._compile_property(name, sub)
                }
                if left_props:
                    residual["properties"] = left_props
            else:
                residual[keyword] = value
        if residual and ("additionalProperties" in residual or "patternProperties" in residual):
            # these read which names `properties` lists: keep every name there
            listed = dict.fromkeys(schema.get("properties", {}), True)
            residual["properties"] = listed | residual.get("properties", {})
        return residual

    def _compile_required(self, names: Iterable[str]) -> list[str]:
        left = []
        for name in names:
            if name in ("id", "type"):
                continue  # the decoder requires both
            if name == "dateObserved" or name in self._measured:
                self._checks.append(("$", _required(name)))
                if name == "dateObserved":
                    self.strings_read.add(name)
            else:
                left.append(name)
        return left

    def _compile_property(self, name: str, sub: Any) -> bool:
        """Add checks for one property's subschema; False if it must go to the residual."""
        if sub is True:
            return True
        if not isinstance(sub, Mapping):
            return False
        keywords = set(sub) - _ANNOTATIONS
        path = f"$.{name}"
        if name in STRING_ATTRIBUTES:
            if not keywords <= _STRING_KEYWORDS:
                return False
            if "pattern" in sub and not _re2_accepts(sub["pattern"]):
                return False
            if sub.get("format", "date-time") != "date-time":
                return False
            checks = _string_checks(name, sub)
        elif name in self._measured:
            if not keywords <= _NUMBER_KEYWORDS:
                return False
            checks = _number_checks(name, sub)
        else:
            return False
        self._checks.extend((path, check) for check in checks)
        if checks and name in STRING_ATTRIBUTES:
            self.strings_read.add(name)
        return True


# ---- compiled checks ------------------------------------------------------------------------
def _required(name: str) -> _Check:
    def check(c: EntityColumns) -> tuple[BoolArray, Callable[[int], str]]:
        if name in c.strings:
            missing = np.asarray(c.strings[name].is_null().to_numpy(zero_copy_only=False))
        else:
            missing = c.absent[name]
        return missing, lambda _: f"{name!r} is a required property"

    return check


def _types_of(sub: Mapping[str, Any]) -> tuple[str, ...] | None:
    declared = sub.get("type")
    if declared is None:
        return None
    return (declared,) if isinstance(declared, str) else tuple(declared)


def _type_message(value: str, types: tuple[str, ...]) -> str:
    return f"{value} is not of type {', '.join(repr(t) for t in types)}"


def _string_checks(name: str, sub: Mapping[str, Any]) -> list[_Check]:
    """Checks on a string attribute; a present value is always a string once decoded."""
    checks: list[_Check] = []

    def values(c: EntityColumns) -> tuple[pa.Array, BoolArray]:
        column = c.strings[name]
        return column, np.asarray(column.is_valid().to_numpy(zero_copy_only=False))

    types = _types_of(sub)
    if types is not None and "string" not in types:

        def wrong_type(c: EntityColumns) -> tuple[BoolArray, Callable[[int], str]]:
            column, present = values(c)
            return present, lambda i: _type_message(repr(column[i].as_py()), types)

        checks.append(wrong_type)
    if "enum" in sub or "const" in sub:
        allowed = list(sub["enum"]) if "enum" in sub else [sub["const"]]
        strings = pa.array([v for v in allowed if isinstance(v, str)], pa.string())

        def member(c: EntityColumns) -> tuple[BoolArray, Callable[[int], str]]:
            column, present = values(c)
            inside = np.asarray(pc.is_in(column, value_set=strings).to_numpy(zero_copy_only=False))
            if "enum" in sub:
                return present & ~inside, lambda i: f"{column[i].as_py()!r} is not one of {allowed!r}"
            return present & ~inside, lambda _: f"{sub['const']!r} was expected"

        checks.append(member)
    if "pattern" in sub:
        pattern = sub["pattern"]

        def matches(c: EntityColumns) -> tuple[BoolArray, Callable[[int], str]]:
            column, present = values(c)
            ok = pc.fill_null(pc.match_substring_regex(column, pattern), True)
            failed = present & ~np.asarray(ok.to_numpy(zero_copy_only=False))
            return failed, lambda i: f"{column[i].as_py()!r} does not match {pattern!r}"

        checks.append(matches)
    if sub.get("format") == "date-time":

        def date_time(c: EntityColumns) -> tuple[BoolArray, Callable[[int], str]]:
            column, present = values(c)
            failed = present & ~_date_times(column)
            return failed, lambda i: f"{column[i].as_py()!r} is not a 'date-time'"

        checks.append(date_time)
    return checks


def _number_checks(name: str, sub: Mapping[str, Any]) -> list[_Check]:
    """Checks on a measured property: its value is a number, or null, or absent."""
    checks: list[_Check] = []

    def shown(c: EntityColumns, i: int) -> str:
        return "None" if c.null[name][i] else repr(float(c.numbers[name][i]))

    types = _types_of(sub)
    if types is not None:
        number_ok = "number" in types
        integer_ok = "integer" in types
        null_ok = "null" in types

        def typed(c: EntityColumns) -> tuple[BoolArray, Callable[[int], str]]:
            value, null = c.numbers[name], c.null[name]
            number = ~c.absent[name] & ~null
            if number_ok:
                failed = np.zeros(c.size, dtype=bool)
            elif integer_ok:
                failed = number & (np.floor(value) != value)
            else:
                failed = number.copy()
            if not null_ok:
                failed |= null
            return failed, lambda i: _type_message(shown(c, i), types)

        checks.append(typed)
    if "enum" in sub or "const" in sub:
        allowed = list(sub["enum"]) if "enum" in sub else [sub["const"]]
        numbers = np.array(
            [float(v) for v in allowed if isinstance(v, int | float) and not isinstance(v, bool)]
        )
        null_allowed = any(v is None for v in allowed)

        def member(c: EntityColumns) -> tuple[BoolArray, Callable[[int], str]]:
            null = c.null[name]
            number = ~c.absent[name] & ~null
            failed = (number & ~np.isin(c.numbers[name], numbers)) | (null & (not null_allowed))
            if "enum" in sub:
                return failed, lambda i: f"{shown(c, i)} is not one of {allowed!r}"
            return failed, lambda _: f"{sub['const']!r} was expected"

        checks.append(member)
    bounds = (
        ("minimum", np.less, "is less than the minimum of"),
        ("maximum", np.greater, "is greater than the maximum of"),
        ("exclusiveMinimum", np.less_equal, "is less than or equal to the minimum of"),
        ("exclusiveMaximum", np.greater_equal, "is greater than or equal to the maximum of"),
    )
    for keyword, outside, say in bounds:
        if keyword in sub:
            checks.append(_bound(name, sub[keyword], outside, say, shown))
    return checks


def _bound(
    name: str,
    limit: float,
    outside: Callable[[FloatArray, float], BoolArray],
    say: str,
    shown: Callable[[EntityColumns, int], str],
) -> _Check:
    def check(c: EntityColumns) -> tuple[BoolArray, Callable[[int], str]]:
        with np.errstate(invalid="ignore"):
            failed = outside(c.numbers[name], limit)  # NaN (absent or null) compares False
        return np.asarray(failed), lambda i: f"{shown(c, i)} {say} {limit!r}"

    return check


# ---- date-time ------------------------------------------------------------------------------
def _date_times(column: pa.Array) -> BoolArray:
    """RFC 3339 date-times. The usual ``YYYY-MM-DDTHH:MM:SSZ`` is checked on the bytes with
    NumPy; other lengths (fractions, offsets) by regex and a parse."""
    n = len(column)
    ok = np.zeros(n, dtype=bool)
    valid = np.asarray(column.is_valid().to_numpy(zero_copy_only=False))
    buffers = column.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int32, count=n + 1, offset=4 * column.offset)
    plain = (np.diff(offsets) == len("2026-01-01T00:00:00Z")) & valid
    if plain.all():  # contiguous: a view, no gather
        data = np.frombuffer(buffers[2], dtype=np.uint8, count=20 * n, offset=int(offsets[0]))
        ok[:] = _plain_utc(data.reshape(n, 20))
    elif plain.any():
        data = np.frombuffer(buffers[2], dtype=np.uint8)
        ok[plain] = _plain_utc(data[offsets[:-1][plain, None] + np.arange(20)])
    rest = valid & ~plain
    if rest.any():
        ok[rest] = _general_date_times(column.filter(pa.array(rest)))
    return ok


_DIGITS = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18]
_DAYS_IN_MONTH = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])


def _plain_utc(rows: npt.NDArray[np.uint8]) -> BoolArray:
    """Rows of 20 bytes: the ``YYYY-MM-DDTHH:MM:SSZ`` shape and a real calendar time."""
    digits = rows[:, _DIGITS] - np.uint8(ord("0"))  # below "0" wraps round to above 9
    shaped = (digits <= 9).all(axis=1)
    for position, char in ((4, "-"), (7, "-"), (13, ":"), (16, ":")):
        shaped &= rows[:, position] == ord(char)
    shaped &= ((rows[:, 10] | 0x20) == ord("t")) & ((rows[:, 19] | 0x20) == ord("z"))
    d = digits.astype(np.int16)  # a year's 9999 fits
    year = d[:, 0] * 1000 + d[:, 1] * 100 + d[:, 2] * 10 + d[:, 3]
    month, day = d[:, 4] * 10 + d[:, 5], d[:, 6] * 10 + d[:, 7]
    hour, minute, second = d[:, 8] * 10 + d[:, 9], d[:, 10] * 10 + d[:, 11], d[:, 12] * 10 + d[:, 13]
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    days = _DAYS_IN_MONTH[np.clip(month, 1, 12) - 1] + (leap & (month == 2))
    calendar = (month >= 1) & (month <= 12) & (day >= 1) & (day <= days)
    return np.asarray(shaped & calendar & (hour <= 23) & (minute <= 59) & (second <= 60))  # 60: a leap second


def _general_date_times(column: pa.Array) -> BoolArray:
    """Any RFC 3339 date-time: the shape by regex; the calendar by a parse that keeps the day
    (Arrow's strptime rejects an hour out of range but rolls 30 February over into March)."""
    upper = pc.utf8_upper(column)
    shaped = pc.fill_null(pc.match_substring_regex(upper, _RFC3339), False)
    parsed = pc.strptime(
        pc.utf8_slice_codeunits(upper, 0, 19), format="%Y-%m-%dT%H:%M:%S", unit="s", error_is_null=True
    )
    written_day = pc.cast(pc.if_else(shaped, pc.utf8_slice_codeunits(upper, 8, 10), "00"), pa.int64())
    same_day = pc.fill_null(pc.equal(pc.day(parsed), written_day), False)
    return np.asarray(pc.and_(shaped, same_day).to_numpy(zero_copy_only=False))


def _is_date_time(instance: object) -> bool:
    if not isinstance(instance, str):
        return True  # format applies to strings only
    return bool(_date_times(pa.array([instance], pa.string()))[0])


_FORMATS = jsonschema.FormatChecker(formats=())
_FORMATS.checks("date-time")(_is_date_time)


def _re2_accepts(pattern: str) -> bool:
    try:
        pc.match_substring_regex(pa.array([""], pa.string()), pattern)
    except pa.ArrowInvalid:
        return False
    return True


def _path(parts: Iterable[str | int]) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


def concise_form(entity: Any) -> Any:
    """An NGSI-LD entity in concise form: each normalized attribute replaced by its value."""
    if not isinstance(entity, dict):
        return entity
    return {key: _concise_value(key, attribute) for key, attribute in entity.items()}


def _concise_value(key: str, attribute: Any) -> Any:
    if not isinstance(attribute, dict) or key in ("id", "type", "@context"):
        return attribute
    kind = attribute.get("type")
    if kind in ("Property", "GeoProperty") and "value" in attribute:
        return attribute["value"]
    if kind == "Relationship" and "object" in attribute:
        return attribute["object"]
    if kind == "LanguageProperty" and "languageMap" in attribute:
        return attribute["languageMap"]
    return attribute
