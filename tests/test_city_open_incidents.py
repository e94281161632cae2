"""The city operator's index of open Incidents: events, listings, and the race between them."""

from __future__ import annotations

from typing import Any

import pytest
from citynerve.operators.city.reconcile import OpenIncidents, open_incident_entry

pytestmark = pytest.mark.timeout(10)


def incident(name: str, scenario: str, state: str = "Detected", namespace: str = "pudong") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace},
            "spec": {"scenarioRef": {"name": scenario}, "state": state}}


def test_events_count_open_incidents_per_scenario() -> None:
    index = OpenIncidents()
    for name in ("a", "b", "c"):
        assert index.observe("pudong", name, incident(name, "burst")["spec"], deleted=False) == "burst"
    index.observe("pudong", "b", incident("b", "burst")["spec"], deleted=False)  # a repeat counts once
    index.observe("minhang", "x", incident("x", "burst")["spec"], deleted=False)
    assert (index.count("pudong", "burst"), index.count("minhang", "burst")) == (3, 1)
    index.observe("pudong", "a", incident("a", "burst", "Resolved")["spec"], deleted=False)
    index.observe("pudong", "c", incident("c", "burst")["spec"], deleted=True)
    assert index.count("pudong", "burst") == 1
    assert index.count("pudong", "flood") == 0


def test_a_listing_replaces_its_namespace_and_catches_unreported_deletions() -> None:
    index = OpenIncidents()
    index.observe("pudong", "gone", incident("gone", "burst")["spec"], deleted=False)
    index.observe("minhang", "x", incident("x", "burst")["spec"], deleted=False)
    listing = [incident("a", "burst"), incident("b", "burst", "Resolved"), incident("c", "flood")]
    mark = index.mark()
    assert index.replace("pudong", [open_incident_entry(i) for i in listing], mark)
    assert (index.count("pudong", "burst"), index.count("pudong", "flood")) == (1, 1)
    assert index.count("minhang", "burst") == 1  # another namespace is left alone
    assert index.replace(None, [], index.mark())  # cluster-wide: everything
    assert index.count("minhang", "burst") == 0


def test_a_listing_older_than_an_event_is_not_applied() -> None:
    index = OpenIncidents()
    mark = index.mark()
    stale = [open_incident_entry(incident("a", "burst"))]  # listed just before it was resolved
    index.observe("pudong", "a", incident("a", "burst", "Resolved")["spec"], deleted=False)
    assert not index.replace("pudong", stale, mark)
    assert index.count("pudong", "burst") == 0
