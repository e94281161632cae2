"""The reasons of the Events CityNerve operators post, each defined once.

An Event tells a person that something happened to an object (`kubectl describe`, `kubectl
get events`); a condition tells what is true now. Each reason here is a CamelCase word, posted
on one kind, as `Normal` or `Warning`. docs/status-and-events.md lists them and a test keeps the
two in step. Besides these, the city operator posts an Event with the condition's own reason
when an object's `Ready` condition flips (steps on the way to Ready excepted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

EventType = Literal["Normal", "Warning"]


@dataclass(frozen=True)
class EventReason:
    """One Event reason: the word, the kind it is posted on, its type and when it is posted."""

    reason: str
    kind: str
    type: EventType
    when: str

    def __str__(self) -> str:
        return self.reason


# --- City (hub operator) -----------------------------------------------------------------------
CITY_JOINED = EventReason(
    "Joined", "City", "Normal", "A hub administrator approved the city and it joined the federation."
)
CITY_UNREACHABLE = EventReason(
    "Unreachable", "City", "Warning", "The city's agent stopped renewing its Lease within the timeout."
)
CITY_RECOVERED = EventReason(
    "Recovered", "City", "Normal", "An unreachable city's agent renewed its Lease again."
)
CITY_OFFBOARDED = EventReason(
    "Offboarded", "City", "Normal", "The city's chart was uninstalled; it takes no more work."
)

# --- Scenario (city operator) ------------------------------------------------------------------
WORKLOAD_STARTED = EventReason(
    "WorkloadStarted", "Scenario", "Normal", "A workload revision of the scenario started running."
)
WORKLOAD_FAILED = EventReason(
    "WorkloadFailed", "Scenario", "Warning", "The scenario's workload failed; the message says why."
)
MODEL_SWAPPED = EventReason(
    "ModelSwapped",
    "Scenario",
    "Normal",
    "A model the scenario scores with resolved to a new version or artifact digest, and the "
    "workload now runs it.",
)

# --- Incident (city operator) ------------------------------------------------------------------
INCIDENT_DETECTED = EventReason(
    "IncidentDetected", "Incident", "Warning", "The city operator first saw the Incident a workload raised."
)
ALERT_DELIVERED = EventReason(
    "AlertDelivered", "Incident", "Normal", "An alert route acknowledged a signed delivery of the Incident."
)
ALERT_FAILED = EventReason(
    "AlertFailed",
    "Incident",
    "Warning",
    "A delivery to an alert route failed; the message says why and when it is tried again.",
)

EVENT_REASONS: tuple[EventReason, ...] = (
    CITY_JOINED,
    CITY_UNREACHABLE,
    CITY_RECOVERED,
    CITY_OFFBOARDED,
    WORKLOAD_STARTED,
    WORKLOAD_FAILED,
    MODEL_SWAPPED,
    INCIDENT_DETECTED,
    ALERT_DELIVERED,
    ALERT_FAILED,
)
