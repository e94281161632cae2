"""The hub's view of a city and of a FederatedScenario, computed purely from what it observes."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping
from typing import Any, cast

from citynerve.operators.api.events import CITY_JOINED, CITY_OFFBOARDED, CITY_RECOVERED, CITY_UNREACHABLE
from citynerve.operators.conditions import (
    ConditionStatus,
    make_condition,
    parse_time,
    rfc3339,
    set_conditions,
)
from citynerve.operators.federation.placement import (
    OFFBOARDED_REASON,
    manifest_hash,
    placed_cities,
    render_sensor_type,
    takes_work,
    unselected_overrides,
    work_name,
)

REPORT_KEY = "report.json"
# In the agent's report: the City labels its chart proposes, and when it left (chart uninstalled).
LABELS_KEY = "labels"
# The kinds of the city's Ready scenarios, in its agent's report (what a promotion soak can observe).
SCENARIO_KINDS_KEY = "scenarioKinds"
OFFBOARDED_KEY = "offboardedAt"


def merge_condition(
    existing: Iterable[Mapping[str, Any]],
    type_: str,
    status: str,
    reason: str,
    message: str,
    now: dt.datetime,
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """Conditions with one set; lastTransitionTime moves only when the status changes."""
    desired = make_condition(type_, cast("ConditionStatus", status), reason, message, generation)
    return set_conditions(existing, [desired], rfc3339(now))


def read_report(report_cm: Mapping[str, Any] | None) -> dict[str, Any]:
    """The agent's report (per work object: applied hash, readiness); empty if none yet."""
    if not report_cm:
        return {}
    try:
        report: dict[str, Any] = json.loads((report_cm.get("data") or {}).get(REPORT_KEY, "{}"))
    except ValueError:
        return {}
    return report


def city_conditions(
    city: Mapping[str, Any],
    lease: Mapping[str, Any] | None,
    report: Mapping[str, Any],
    work_hashes: Mapping[str, str],
    now: dt.datetime,
) -> list[dict[str, Any]]:
    """Joined, Reachable and Ready for one City, from its spec, Lease and agent report."""
    spec = city.get("spec", {})
    status = city.get("status") or {}
    generation = city.get("metadata", {}).get("generation")
    conditions: list[dict[str, Any]] = list(status.get("conditions") or [])
    name = city["metadata"]["name"]

    left = report.get(OFFBOARDED_KEY)
    if left:
        message = (f"City {name}'s chart was uninstalled at {left}: it takes no work. Its namespace "
                   f"city-{name} and access stay until `kubectl delete city {name}`.")
        for type_ in ("Joined", "Reachable", "Ready"):
            conditions = merge_condition(conditions, type_, "False", OFFBOARDED_REASON, message, now,
                                         generation)
        return conditions

    if spec.get("approved"):
        conditions = merge_condition(conditions, "Joined", "True", "Approved",
                                     f"City {name} was approved and has its namespace city-{name}.",
                                     now, generation)
    else:
        conditions = merge_condition(
            conditions, "Joined", "False", "AwaitingApproval",
            f"City {name} asked to join; a hub administrator must set spec.approved: true.",
            now, generation)

    timeout = int(spec.get("connection", {}).get("heartbeatTimeoutSeconds", 40))
    renewed = parse_time((lease or {}).get("spec", {}).get("renewTime"))
    if renewed is None:
        reachable = ("Unknown", "NoHeartbeat", f"City {name}'s agent has not sent a heartbeat yet.")
    elif (now - renewed).total_seconds() > timeout:
        # Since when, not for how long: a message that grew every check would be written every check.
        reachable = ("False", "HeartbeatMissed",
                     f"No heartbeat from {name} since {rfc3339(renewed)} (timeout {timeout} s); its last "
                     "applied work keeps running there, and nothing is deleted.")
    else:
        reachable = ("True", "HeartbeatReceived", f"{name}'s agent checked in at {rfc3339(renewed)}.")
    conditions = merge_condition(conditions, "Reachable", *reachable, now, generation)

    applied = report.get("objects", {})
    pending = sorted(n for n, h in work_hashes.items() if applied.get(n, {}).get("hash") != h)
    failed = sorted(n for n, o in applied.items() if n in work_hashes and not o.get("applied", False))
    joined = spec.get("approved")
    if not joined:
        ready = ("False", "NotJoined", f"City {name} is not approved yet.")
    elif reachable[0] != "True":
        ready = ("False", "Unreachable", f"City {name} is not reachable: {reachable[2]}")
    elif failed:
        ready = ("False", "ApplyFailed",
                 f"{name} could not apply {', '.join(failed)}: {applied[failed[0]].get('message', '')}")
    elif pending:
        ready = ("False", "Propagating", f"{name} has not applied yet: {', '.join(pending[:5])}.")
    else:
        ready = ("True", "AllWorkApplied",
                 f"{name} runs all {len(work_hashes)} objects the hub placed there.")
    conditions = merge_condition(conditions, "Ready", *ready, now, generation)
    proposal = labels_accepted(city, report)
    if proposal is not None:
        conditions = merge_condition(conditions, "LabelsAccepted", *proposal, now, generation)
    return conditions


def city_status(
    city: Mapping[str, Any],
    lease: Mapping[str, Any] | None,
    report: Mapping[str, Any],
    work_hashes: Mapping[str, str],
    now: dt.datetime,
) -> dict[str, Any]:
    """The part of a City's status the hub owns: its conditions, observedGeneration and
    ``lastHeartbeat`` (the agent's Lease ``renewTime``; the agent writes only its roll-up)."""
    wanted: dict[str, Any] = {
        "conditions": city_conditions(city, lease, report, work_hashes, now),
        "observedGeneration": city.get("metadata", {}).get("generation"),
    }
    renewed = parse_time((lease or {}).get("spec", {}).get("renewTime"))
    if renewed is not None:
        # The Lease renews every heartbeat, so this changes, and is written, once per heartbeat;
        # the checks in between find it unchanged and write nothing.
        wanted["lastHeartbeat"] = rfc3339(renewed)
    return wanted


# Events on a City when its conditions cross these lines: (type, reason, message).
LifecycleEvent = tuple[str, str, str]


def lifecycle_events(name: str, old: Iterable[Mapping[str, Any]],
                     new: Iterable[Mapping[str, Any]]) -> list[LifecycleEvent]:
    """The Events a City's condition transitions call for, from its conditions before and after.

    Only transitions count, so a check that changes nothing, or a restarted hub operator that
    finds the same conditions, tells nothing twice.
    """
    before = {c.get("type"): c for c in old}
    after = {c.get("type"): c for c in new}

    def state(conditions: Mapping[Any, Mapping[str, Any]], type_: str) -> tuple[Any, Any]:
        condition = conditions.get(type_) or {}
        return condition.get("status"), condition.get("reason")

    joined_was, joined = state(before, "Joined"), state(after, "Joined")
    if joined[1] == OFFBOARDED_REASON:
        if joined_was[1] == OFFBOARDED_REASON:
            return []
        return [(CITY_OFFBOARDED.type, CITY_OFFBOARDED.reason,
                 f"City {name}'s chart was uninstalled, so it takes no more work. Run `kubectl delete "
                 f"city {name}` to remove its namespace city-{name} and its access to the hub.")]
    events: list[LifecycleEvent] = []
    if joined[0] == "True" and joined_was[0] != "True":
        events.append((CITY_JOINED.type, CITY_JOINED.reason,
                       f"City {name} was approved and joined the federation; the work placed on it "
                       f"propagates through namespace city-{name}."))
    reachable_was, reachable = state(before, "Reachable"), state(after, "Reachable")
    if reachable_was[0] == "True" and reachable[0] == "False":
        events.append((CITY_UNREACHABLE.type, CITY_UNREACHABLE.reason,
                       f"City {name} stopped sending heartbeats. {after['Reachable'].get('message', '')} "
                       "Check that its operator runs and can reach the hub."))
    elif reachable_was == ("False", "HeartbeatMissed") and reachable[0] == "True":
        events.append((CITY_RECOVERED.type, CITY_RECOVERED.reason,
                       f"City {name} is reachable again; work changed while it was away propagates now."))
    return events


def labels_accepted(city: Mapping[str, Any], report: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """The ``LabelsAccepted`` condition: whether the City carries the labels its chart proposes.

    Labels place work, so they are the hub administrator's: a city only proposes them (its
    report), and the administrator accepts with ``kubectl label``. None: nothing proposed.
    """
    proposed = report.get(LABELS_KEY)
    if not isinstance(proposed, dict) or not proposed:
        return None
    name = city["metadata"]["name"]
    current = (city.get("metadata") or {}).get("labels") or {}
    differ = {str(k): str(v) for k, v in sorted(proposed.items()) if current.get(k) != v}
    if not differ:
        return ("True", "ChartLabelsApplied", f"City {name} carries every label its chart proposes.")
    pairs = " ".join(f"{k}={v}" for k, v in differ.items())
    return ("False", "LabelsProposed",
            f"City {name}'s chart proposes {pairs}; labels place work, so a hub administrator accepts "
            f"them: kubectl label city {name} {pairs} --overwrite")


def federated_scenario_status(
    body: Mapping[str, Any],
    cities: Iterable[Mapping[str, Any]],
    reports: Mapping[str, Mapping[str, Any]],
    now: dt.datetime,
) -> dict[str, Any]:
    """Per-city propagation and readiness of a FederatedScenario, from the agents' reports, and
    whether every override names a city the placement selects (``OverridesMatched``)."""
    name = body["metadata"]["name"]
    generation = body["metadata"].get("generation")
    cities = list(cities)
    selected = placed_cities(body["spec"], cities)
    wname = work_name("Scenario", name)
    per_city = []
    for city in selected:
        entry = reports.get(city, {}).get("objects", {}).get(wname, {})
        propagated = "True" if entry.get("applied") else ("False" if entry else "Unknown")
        ready = entry.get("ready", "Unknown")
        item: dict[str, Any] = {"city": city, "propagated": propagated, "ready": ready}
        if entry.get("reason"):
            item["reason"] = entry["reason"]
        if entry.get("message"):
            item["message"] = entry["message"]
        per_city.append(item)
    ready_count = sum(1 for c in per_city if c["ready"] == "True")
    conditions = list((body.get("status") or {}).get("conditions") or [])
    if not selected:
        cond = ("False", "NoCitySelected", "The placement selects no joined city.")
    elif all(c["propagated"] == "True" for c in per_city):
        cond = ("True", "Propagated", f"Applied in {len(per_city)} of {len(per_city)} selected cities.")
    else:
        waiting = [c["city"] for c in per_city if c["propagated"] != "True"]
        cond = ("False", "Propagating", f"Not yet applied in {', '.join(waiting)}.")
    conditions = merge_condition(conditions, "Propagated", *cond, now, generation)
    conditions = merge_condition(conditions, "Ready", *federated_ready(per_city), now, generation)
    conditions = merge_condition(conditions, "OverridesMatched", *overrides_matched(body["spec"], cities),
                                 now, generation)
    return {"observedGeneration": generation, "selectedCities": len(selected),
            "readyCities": ready_count, "cities": per_city, "conditions": conditions}


def federated_ready(per_city: list[dict[str, Any]]) -> tuple[str, str, str]:
    """The ``Ready`` condition of a FederatedScenario: its Scenario is Ready in every selected city."""
    if not per_city:
        return ("False", "NoCitySelected", "The placement selects no joined city: the scenario runs nowhere.")
    waiting = [c for c in per_city if c["ready"] != "True"]
    if not waiting:
        return ("True", "ReadyInEveryCity", f"The Scenario is Ready in all {len(per_city)} selected cities.")
    first = waiting[0]
    why = f" ({first['reason']}: {first.get('message', '')})" if first.get("reason") else ""
    names = ", ".join(c["city"] for c in waiting)
    ready = len(per_city) - len(waiting)
    return ("False", "NotReadyInSomeCities",
            f"The Scenario is Ready in {ready} of {len(per_city)} selected cities, not in {names}. In "
            f"{first['city']} its Ready is {first['ready']}{why}.")


def sensor_type_status(
    body: Mapping[str, Any],
    cities: Iterable[Mapping[str, Any]],
    reports: Mapping[str, Mapping[str, Any]],
    now: dt.datetime,
) -> dict[str, Any]:
    """``propagatedCities`` and ``Propagated`` of a SensorType, from the cities' agent reports (pure).

    A city holds the current spec when its agent reports the work of this SensorType applied
    with the hash of what the hub writes now; every city that takes work should.
    """
    name = body["metadata"]["name"]
    generation = body["metadata"].get("generation")
    wname = work_name("SensorType", name)
    wanted = manifest_hash(render_sensor_type(body))
    taking = sorted(c["metadata"]["name"] for c in cities if takes_work(c))
    holding = [c for c in taking if (reports.get(c, {}).get("objects", {}).get(wname) or {}).get("applied")
               and reports[c]["objects"][wname].get("hash") == wanted]
    if not taking:
        cond = ("False", "NoCityJoined", f"No city has joined the federation yet, so SensorType {name} is "
                "held by none.")
    elif len(holding) == len(taking):
        cond = ("True", "Propagated",
                f"All {len(taking)} joined cities hold the current spec of SensorType {name}.")
    else:
        waiting = ", ".join(c for c in taking if c not in holding)
        cond = ("False", "Propagating",
                f"{len(holding)} of {len(taking)} joined cities hold the current spec of SensorType {name}; "
                f"waiting for {waiting}.")
    conditions = merge_condition((body.get("status") or {}).get("conditions") or [], "Propagated", *cond, now,
                                 generation)
    return {"observedGeneration": generation, "propagatedCities": len(holding), "conditions": conditions}


def overrides_matched(spec: Mapping[str, Any], cities: Iterable[Mapping[str, Any]]) -> tuple[str, str, str]:
    """The ``OverridesMatched`` condition: an override for a city the placement never selects does nothing."""
    unselected = unselected_overrides(spec, cities)
    if unselected:
        names = ", ".join(unselected)
        return ("False", "OverrideForUnselectedCity",
                f"spec.overrides names {names}, which the placement does not select: not in "
                "spec.placement.cities and no City of that name matches spec.placement.citySelector. The "
                "override does nothing; correct the city's name or the placement, or remove the override.")
    if not spec.get("overrides"):
        return ("True", "NoOverrides", "Every placed city runs the template as it is.")
    return ("True", "OverridesSelected", "Every override names a city the placement selects.")


def status_changes(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> dict[str, Any]:
    """The part of ``desired`` that differs from ``current``, ignoring transition times of
    conditions whose status did not change (merge_condition keeps those anyway)."""
    current = current or {}
    return {k: v for k, v in desired.items() if current.get(k) != v}
