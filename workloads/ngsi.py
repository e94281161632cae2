"""NGSI-LD entities following FIWARE Smart Data Models: building them and decoding them fast.

Simulated terminals report observations as entities of their Smart Data Model type
(`WaterObserved`, `WaterQualityObserved`, `FloodMonitoring`, `CrowdFlowObserved`,
`TrafficFlowObserved`, and `Device` for the terminal itself). Two representations are
accepted, both from the NGSI-LD API (ETSI GS CIM 009):

* normalized: ``"pressure": {"type": "Property", "value": 41.2, "unitCode": "MTR",
  "observedAt": "2026-11-25T10:00:00Z"}``
* concise (1.6+): ``"pressure": 41.2`` with the entity's ``dateObserved`` as the time.

Decoding uses msgspec with a struct generated per sensor type, so type checking happens in
the decoder's C code and a malformed entity fails with a message naming the offending path.
A sensor type's ``payloadSchema`` is then evaluated on the decoded columns (see
`citynerve.workloads.ingest.payload_schema`); an entity it rejects is a failure too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import pandas as pd  # type: ignore[import-untyped]  # no stubs in this environment
import pyarrow as pa
import pyarrow.compute as pc
from citynerve.workloads.ingest.payload_schema import EntityColumns, PayloadSchema, concise_form
from citynerve.workloads.ingest.sensor_type import SensorType
from citynerve.workloads.sim.readings import READING_SCHEMA, Readings

NGSI_LD_CONTEXT = "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context-v1.8.jsonld"
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def entity_id(data_model: str, sensor: str) -> str:
    return f"urn:ngsi-ld:{data_model}:{sensor}"


def _iso(ms: int) -> str:
    return str(np.datetime64(int(ms), "ms").astype("datetime64[s]")) + "Z"


def to_ngsi_entities(
    readings: Readings,
    sensor_type: SensorType,
    epoch_ms: int = 0,
    concise: bool = True,
    locations: Mapping[str, tuple[float, float]] | None = None,
) -> list[dict[str, Any]]:
    """One entity per (sensor, time), carrying every property measured then; missing values omitted."""
    frame = pd.DataFrame(
        {"sensor": readings.sensor, "time_s": readings.time_s, "prop": readings.prop, "value": readings.value}
    ).dropna(subset=["value"])
    wide = frame.pivot_table(index=["sensor", "time_s"], columns="prop", values="value", aggfunc="first")
    units = {p.name: p.unit for p in sensor_type.properties}
    entities = []
    for (sensor, time_s), row in wide.iterrows():
        observed = _iso(epoch_ms + round(float(time_s) * 1000))
        entity: dict[str, Any] = {
            "id": entity_id(sensor_type.data_model, str(sensor)),
            "type": sensor_type.data_model,
        }
        if concise:
            entity["dateObserved"] = observed
        else:
            entity["dateObserved"] = {"type": "Property", "value": observed}
            entity["@context"] = [NGSI_LD_CONTEXT]
            entity["refDevice"] = {"type": "Relationship", "object": entity_id("Device", str(sensor))}
        for prop, value in row.items():
            if np.isnan(value):
                continue
            if concise:
                entity[str(prop)] = float(value)
            else:
                entity[str(prop)] = {
                    "type": "Property",
                    "value": float(value),
                    "unitCode": units.get(str(prop), ""),
                    "observedAt": observed,
                }
        if locations and sensor in locations:
            lon, lat = locations[str(sensor)]
            entity["location"] = {
                "type": "GeoProperty",
                "value": {"type": "Point", "coordinates": [lon, lat]},
            }
        entities.append(entity)
    return entities


def device_entity(
    sensor: str, sensor_type: SensorType, lon: float | None = None, lat: float | None = None
) -> dict[str, Any]:
    """The terminal itself, as a FIWARE `Device`."""
    entity: dict[str, Any] = {
        "id": entity_id("Device", sensor),
        "type": "Device",
        "@context": [NGSI_LD_CONTEXT],
        "controlledProperty": {"type": "Property", "value": list(sensor_type.property_names)},
        "category": {"type": "Property", "value": ["sensor"]},
        "deviceCategory": {"type": "Property", "value": [sensor_type.name]},
    }
    if lon is not None and lat is not None:
        entity["location"] = {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [lon, lat]}}
    return entity


class _NormalizedProperty(msgspec.Struct, frozen=True):
    value: float
    type: str = "Property"
    unitCode: str | None = None  # noqa: N815 - NGSI-LD attribute names
    observedAt: str | None = None  # noqa: N815 - NGSI-LD attribute names


class _NormalizedDate(msgspec.Struct, frozen=True):
    value: str
    type: str = "Property"


@dataclass(frozen=True)
class DecodeFailure:
    """An entity that could not be decoded: its raw JSON and why."""

    raw: bytes
    reason: str


@dataclass(frozen=True)
class DecodedEntities:
    batch: pa.RecordBatch  # READING_SCHEMA; values and times as sent (validation comes later)
    failures: list[DecodeFailure]
    entities: int


class NgsiDecoder:
    """Decode a JSON array of NGSI-LD entities of one sensor type into a columnar batch.

    The fast path decodes the whole array with a typed struct; when any entity is malformed
    the array is split into raw entities and each decoded alone, so the good ones pass and the
    bad ones are reported with msgspec's message (which names the offending field path).
    A measured property that is absent decodes as UNSET, apart from one sent as null: the
    payload schema tells them apart, the readings do not (neither is a reading).
    """

    def __init__(self, sensor_type: SensorType) -> None:
        self.sensor_type = sensor_type
        names = sensor_type.property_names
        self._prefix = f"urn:ngsi-ld:{sensor_type.data_model}:"
        self._prop_names = pa.array(names, pa.string())
        self._schema = (
            PayloadSchema(sensor_type.payload_schema, names, f"SensorType {sensor_type.name}")
            if sensor_type.payload_schema is not None
            else None
        )
        unset = msgspec.UNSET
        concise = msgspec.defstruct(
            f"{sensor_type.data_model}Concise",
            [
                ("id", str),
                ("type", str),
                ("dateObserved", str),
                *[(n, float | None | msgspec.UnsetType, unset) for n in names],
            ],
            kw_only=True,
        )
        normalized = msgspec.defstruct(
            f"{sensor_type.data_model}Normalized",
            [
                ("id", str),
                ("type", str),
                ("dateObserved", _NormalizedDate | None, None),
                *[(n, _NormalizedProperty | None | msgspec.UnsetType, unset) for n in names],
            ],
            kw_only=True,
        )
        self._concise = concise
        self._normalized = normalized
        self._array_decoders = [
            msgspec.json.Decoder(list[concise]),  # type: ignore[valid-type]
            msgspec.json.Decoder(list[normalized]),  # type: ignore[valid-type]
        ]
        self._one_decoders = [msgspec.json.Decoder(concise), msgspec.json.Decoder(normalized)]
        self._raw_array = msgspec.json.Decoder(list[msgspec.Raw])

    def decode(self, payload: bytes) -> DecodedEntities:
        for decoder, concise in zip(self._array_decoders, (True, False), strict=True):
            try:
                entities = decoder.decode(payload)
            except msgspec.DecodeError:
                continue
            raws = functools.cache(functools.partial(self._raw_array.decode, payload))
            batch, failures = self._columns(entities, concise, raws)
            return DecodedEntities(batch, failures, len(entities))
        return self._decode_one_by_one(payload)

    def _decode_one_by_one(self, payload: bytes) -> DecodedEntities:
        try:
            raws = self._raw_array.decode(payload)
        except msgspec.DecodeError as err:
            # not even a JSON array: the whole payload is one failure
            return DecodedEntities(_empty_batch(), [DecodeFailure(payload, f"undecodable: {err}")], 0)
        concise: list[Any] = []
        normalized: list[Any] = []
        concise_raws: list[msgspec.Raw] = []
        normalized_raws: list[msgspec.Raw] = []
        failures: list[DecodeFailure] = []
        for raw in raws:
            errors = []
            for decoder, bucket, bucket_raws in zip(
                self._one_decoders, (concise, normalized), (concise_raws, normalized_raws), strict=True
            ):
                try:
                    bucket.append(decoder.decode(raw))
                    bucket_raws.append(raw)
                    break
                except msgspec.DecodeError as err:
                    errors.append(str(err))
            else:
                failures.append(DecodeFailure(bytes(raw), f"undecodable: {errors[0]}"))
        batches = []
        for bucket, bucket_raws, is_concise in (
            (concise, concise_raws, True),
            (normalized, normalized_raws, False),
        ):
            batch, rejected = self._columns(bucket, is_concise, _given(bucket_raws))
            batches.append(batch)
            failures.extend(rejected)
        table = pa.Table.from_batches(batches, schema=READING_SCHEMA).combine_chunks()
        batch = table.to_batches()[0] if table.num_rows else _empty_batch()
        return DecodedEntities(batch, failures, len(raws))

    def _columns(
        self, entities: list[Any], concise: bool, raws: Callable[[], Sequence[msgspec.Raw]]
    ) -> tuple[pa.RecordBatch, list[DecodeFailure]]:
        """Long-form columns: per property, the entities that carry it (getters run in C, not per field).

        Entities of another type, rejected by the payload schema, or carrying none of the sensor
        type's properties are returned as failures: they decoded, but hold nothing this
        pipeline can take. ``raws`` gives the entities' JSON (called only when needed).
        """
        failures: list[DecodeFailure] = []
        if not entities:
            return _empty_batch(), failures
        positions: npt.NDArray[np.int64] | None = None  # in `raws`, once entities were dropped
        types = list(map(attrgetter("type"), entities))
        if types.count(self.sensor_type.data_model) != len(types):
            wrong = np.array(types, dtype=object) != self.sensor_type.data_model
            failures.extend(
                DecodeFailure(
                    msgspec.json.encode(e),
                    f"wrong-entity-type: {e.type!r} is not {self.sensor_type.data_model!r}",
                )
                for e, w in zip(entities, wrong, strict=True)
                if w
            )
            entities = [e for e, w in zip(entities, wrong, strict=True) if not w]
            types = [t for t, w in zip(types, wrong, strict=True) if not w]
            positions = np.flatnonzero(~wrong)
            if not entities:
                return _empty_batch(), failures
        n = len(entities)
        # encode ids once; strip the entity-type prefix on the distinct values only
        id_strings = pa.array(list(map(attrgetter("id"), entities)), pa.string())
        ids = id_strings.dictionary_encode()
        distinct = ids.dictionary
        sensor_names = pc.if_else(
            pc.starts_with(distinct, self._prefix),
            pc.utf8_slice_codeunits(distinct, len(self._prefix)),
            distinct,
        )
        sensor_idx = np.asarray(ids.indices.to_numpy(zero_copy_only=False), dtype=np.int32)
        if concise:
            dates: list[str | None] = list(map(attrgetter("dateObserved"), entities))
        else:
            dates = [d.value if d is not None else None for d in map(attrgetter("dateObserved"), entities)]
        date_strings = pa.array(dates, pa.string())
        entity_ts = _parse_times(dates, date_strings)
        names = self.sensor_type.property_names
        values: dict[str, npt.NDArray[np.float64]] = {}
        absent: dict[str, npt.NDArray[np.bool_]] = {}
        null: dict[str, npt.NDArray[np.bool_]] = {}
        times: dict[str, npt.NDArray[np.int64]] = {}
        for name in names:
            raw = list(map(attrgetter(name), entities))
            values[name], absent[name], null[name] = _numbers(raw) if concise else _normalized(raw)
            times[name] = entity_ts
            if not concise:
                times[name] = _observed_times(raw, ~absent[name] & ~null[name], entity_ts)
        keep = np.ones(n, dtype=bool)
        if self._schema is not None:

            def raw_of(i: int) -> bytes:
                return bytes(raws()[i if positions is None else int(positions[i])])

            def concise_entities() -> list[Any]:
                return [concise_form(msgspec.json.decode(raw_of(i))) for i in range(n)]

            read = self._schema.strings_read
            columns = EntityColumns(
                size=n,
                strings={
                    **({"id": id_strings} if "id" in read else {}),
                    **({"type": pa.array(types, pa.string())} if "type" in read else {}),
                    **({"dateObserved": date_strings} if "dateObserved" in read else {}),
                },
                numbers=values,
                absent=absent,
                null=null,
            )
            for i, message in sorted(self._schema.violations(columns, concise_entities).items()):
                failures.append(DecodeFailure(raw_of(i), f"payload-schema: {message}"))
                keep[i] = False
        carried = np.zeros(n, dtype=np.int64)
        parts_sensor: list[npt.NDArray[np.int32]] = []
        parts_prop: list[npt.NDArray[np.int32]] = []
        parts_ts: list[npt.NDArray[np.int64]] = []
        parts_val: list[npt.NDArray[np.float64]] = []
        for prop_no, name in enumerate(names):
            present = ~np.isnan(values[name]) & keep
            carried += present
            if not present.any():
                continue
            if present.all():
                parts_sensor.append(sensor_idx)
                parts_ts.append(times[name])
                parts_val.append(values[name])
            else:
                parts_sensor.append(sensor_idx[present])
                parts_ts.append(times[name][present])
                parts_val.append(values[name][present])
            parts_prop.append(np.full(parts_val[-1].size, prop_no, dtype=np.int32))
        empty = np.flatnonzero((carried == 0) & keep)
        failures.extend(
            DecodeFailure(
                msgspec.json.encode(entities[i]),
                f"no-measured-property: carries none of {list(names)}",
            )
            for i in empty
        )
        if not parts_val:
            return _empty_batch(), failures
        sensor_col = pa.DictionaryArray.from_arrays(pa.array(np.concatenate(parts_sensor)), sensor_names)
        prop_col = pa.DictionaryArray.from_arrays(pa.array(np.concatenate(parts_prop)), self._prop_names)
        ts_arr = np.concatenate(parts_ts)
        ts_col = pa.array(ts_arr, pa.int64(), mask=ts_arr == _NO_TIME)
        batch = pa.RecordBatch.from_arrays(
            [sensor_col, prop_col, ts_col, pa.array(np.concatenate(parts_val))], schema=READING_SCHEMA
        )
        return batch, failures


_NO_TIME = np.iinfo(np.int64).min


def _given(raws: Sequence[msgspec.Raw]) -> Callable[[], Sequence[msgspec.Raw]]:
    return lambda: raws


def _numbers(
    raw: list[Any],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """A concise property's values (NaN where absent or null), where it is absent, where null."""
    n = len(raw)
    try:
        values = np.array(raw, dtype=np.float64)  # None becomes NaN; UNSET raises
        absent = np.zeros(n, dtype=bool)
    except TypeError:
        objects = np.array(raw, dtype=object)
        absent = np.asarray(objects == msgspec.UNSET, dtype=bool)
        objects[absent] = None
        values = objects.astype(np.float64)
    null = np.array([v is None for v in raw], dtype=bool) if raw.count(None) else np.zeros(n, dtype=bool)
    return values, absent, null


def _normalized(
    raw: list[Any],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """A normalized property's values (NaN where absent or null), where it is absent, where null."""
    present = np.array([p.__class__ is _NormalizedProperty for p in raw], dtype=bool)
    null = np.zeros(len(raw), dtype=bool)
    if raw.count(None):
        null = np.array([p is None for p in raw], dtype=bool)
    values = np.full(len(raw), np.nan)
    values[present] = [p.value for p in raw if p.__class__ is _NormalizedProperty]
    return values, ~present & ~null, null


def _observed_times(
    raw: list[Any], present: npt.NDArray[np.bool_], entity_ts: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """A normalized property's own ``observedAt`` where it has one, else the entity's time."""
    observed = [p.observedAt for p in raw if p.__class__ is _NormalizedProperty]
    if all(o is None for o in observed):
        return entity_ts
    own = np.full(len(raw), _NO_TIME, dtype=np.int64)
    own[present] = _parse_times(observed, pa.array(observed, pa.string()))
    return np.where(own == _NO_TIME, entity_ts, own)


def _parse_times(stamps: list[str | None], arr: pa.Array) -> npt.NDArray[np.int64]:
    """ISO 8601 UTC stamps (as a list and as Arrow strings) to epoch ms, vectorised; unparseable
    or absent ones become _NO_TIME."""
    parsed = pc.strptime(arr, format=_TIME_FORMAT, unit="ms", error_is_null=True)
    out = np.asarray(
        parsed.cast(pa.int64()).fill_null(_NO_TIME).to_numpy(zero_copy_only=False), dtype=np.int64
    )
    retry = np.flatnonzero((out == _NO_TIME) & np.asarray(arr.is_valid().to_numpy(zero_copy_only=False)))
    if retry.size:
        # fractional seconds or an explicit offset: the general (slower) ISO 8601 parser. Arrow's
        # array without nulls converts zero-copy, hence read-only: write into a copy.
        out = out.copy()
        for i in retry:
            try:
                stamp = pd.Timestamp(stamps[i])
            except (ValueError, TypeError):
                continue
            if stamp.tzinfo is not None:  # a stamp without an offset is ambiguous: stays unparsed
                out[i] = int(stamp.tz_convert("UTC").value // 1_000_000)
    return out


def _empty_batch() -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([pa.array([], f.type) for f in READING_SCHEMA], schema=READING_SCHEMA)
