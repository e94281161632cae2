"""The data plane's wire names: subjects, MQTT topics, streams, buckets, headers.

Defined once here; the broker, the HTTP gateway, the stream workers, the city operator and
the tests import them. Nothing of ours is imported (the contract layer may be imported by all).

A city's readings travel on one NATS server (JetStream) per city::

    terminal ──MQTT readings/<city>/<fleet>──┐
    gateway ──NGSI-LD POST──▶ HTTP gateway ──┴─▶ readings.<city>.<fleet>   stream per fleet (work queue)
    stream worker of the fleet ──▶ windows.<city>.<fleet>.<property>       stream per fleet (retention)
                               ──▶ quarantine.<city>.<fleet>               stream per city (7 days)
                               ──▶ KV bucket citynerve-fleets: <fleet>.status, <fleet>.checkpoint

Fleet, city and property names are DNS labels or NGSI-LD attribute names, so none holds a
``.`` (a NATS token separator) or a ``/`` (an MQTT level separator).
"""

from __future__ import annotations

import re

# -- subjects and topics ---------------------------------------------------------------------------
READINGS_PREFIX = "readings"
WINDOWS_PREFIX = "windows"
QUARANTINE_PREFIX = "quarantine"

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


def _token(kind: str, value: str) -> str:
    if not _TOKEN.match(value):
        msg = f"{kind} {value!r} cannot name a subject: letters, digits, '-' and '_' only"
        raise ValueError(msg)
    return value


def readings_subject(city: str, fleet: str) -> str:
    """Where a fleet's raw payloads land (MQTT topic ``readings/<city>/<fleet>`` maps here)."""
    return f"{READINGS_PREFIX}.{_token('city', city)}.{_token('fleet', fleet)}"


def readings_topic(city: str, fleet: str) -> str:
    """The MQTT topic a fleet's terminals publish to (QoS 1)."""
    return readings_subject(city, fleet).replace(".", "/")


def windows_subject(city: str, fleet: str, prop: str = "*") -> str:
    """Closed window aggregates of one property of a fleet (``*``: every property)."""
    last = prop if prop == "*" else _token("property", prop)
    return f"{WINDOWS_PREFIX}.{_token('city', city)}.{_token('fleet', fleet)}.{last}"


def quarantine_subject(city: str, fleet: str) -> str:
    """Quarantined payloads and readings of a fleet, each with its reason."""
    return f"{QUARANTINE_PREFIX}.{_token('city', city)}.{_token('fleet', fleet)}"


def quarantine_subjects(city: str) -> str:
    """Every fleet's quarantine subject in a city: what the city's quarantine stream covers."""
    return f"{QUARANTINE_PREFIX}.{_token('city', city)}.>"


# -- streams, consumers, buckets -------------------------------------------------------------------
def readings_stream(fleet: str) -> str:
    """JetStream stream of a fleet's raw payloads (work-queue retention: gone once windowed)."""
    return f"citynerve-readings-{_token('fleet', fleet)}"


def windows_stream(fleet: str) -> str:
    """JetStream stream of a fleet's closed windows (kept for the fleet's history retention)."""
    return f"citynerve-windows-{_token('fleet', fleet)}"


QUARANTINE_STREAM = "citynerve-quarantine"
WORKER_CONSUMER = "ingest"  # the durable consumer of a fleet's readings stream
FLEETS_BUCKET = "citynerve-fleets"  # KV: per-fleet status and the workers' window checkpoint


def status_key(fleet: str) -> str:
    """KV key of a fleet's ingest status (counters, terminals online, freshness)."""
    return f"{_token('fleet', fleet)}.status"


ALL_STATUS_KEYS = "*.status"  # what the city operator watches: every fleet's status


def checkpoint_key(fleet: str) -> str:
    """KV key of a fleet's window checkpoint (windows before it are published)."""
    return f"{_token('fleet', fleet)}.checkpoint"


def inbox_prefix(user: str) -> str:
    """The reply subjects of one broker identity (``<prefix>.<id>``): its own, so that no other
    identity can subscribe to the answers it gets (a KV read of its fleet's status, say)."""
    return f"_INBOX_{_token('user', user)}"


SCORING_PREFIX = "scoring-"


def scoring_identity(scenario_uid: str) -> str:
    """A Scenario's live workload on the broker: its user name, and the name of its durable consumer
    on each of its fleets' windows streams (by the Scenario's uid: a Scenario deleted and made
    again starts afresh)."""
    return f"{SCORING_PREFIX}{_token('scenario uid', scenario_uid)}"


# -- headers ------------------------------------------------------------------------------------
HEADER_MSG_ID = "Nats-Msg-Id"  # JetStream de-duplicates publishes by it within the stream's window
HEADER_CONTENT_TYPE = "Content-Type"
HEADER_REASON = "CityNerve-Reason"  # on quarantine messages: why
HEADER_SOURCE = "CityNerve-Source"  # on quarantine messages: <stream>:<sequence> of the payload
HEADER_WINDOW_START = "CityNerve-Window-Start"  # on window messages: RFC 3339 start of the window
HEADER_WINDOW_SECONDS = "CityNerve-Window-Seconds"

CONTENT_NGSI_LD = "application/ld+json"
CONTENT_JSON = "application/json"
CONTENT_ARROW = "application/vnd.apache.arrow.stream"

# -- ports (the chart's Service and the local broker use the same) ------------------------------
CLIENT_PORT = 4222
MQTT_PORT = 1883
MONITOR_PORT = 8222

# -- history ------------------------------------------------------------------------------------
HISTORY_CONSUMER = "history"  # durable consumer of a fleet's windows stream: writes its Parquet history
