"""The city operator's broker credentials: derived, stable, and accepted by a real nats-server."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import bcrypt
import nats
import pytest
from citynerve.operators.city.broker import (
    Credentials,
    FleetIdentity,
    ScenarioIdentity,
    ScoringAccess,
    derive_password,
    derived_hash,
)
from citynerve.operators.localfed import toolchain
from citynerve.workloads.dataplane import names
from citynerve.workloads.dataplane.broker import LocalBroker

pytestmark = pytest.mark.timeout(60)
KEY = b"k" * 32
FLEETS = {
    "jinjiang-pressure": FleetIdentity("city", "jinjiang-pressure", "uid-1", "MQTT"),
    "chunxi-crowd": FleetIdentity("city", "chunxi-crowd", "uid-2", "HTTP"),
}


def test_passwords_derive_from_key_role_and_fleet_uid() -> None:
    assert derive_password(KEY, "ingest", "uid-1") == derive_password(KEY, "ingest", "uid-1")
    others = {derive_password(KEY, "mqtt", "uid-1"), derive_password(KEY, "ingest", "uid-2"),
              derive_password(b"x" * 32, "ingest", "uid-1")}
    assert derive_password(KEY, "ingest", "uid-1") not in others  # role, fleet (uid) and key all count
    assert len(derive_password(KEY, "ingest", "uid-1")) >= 40


def test_hashes_are_bcrypt_and_the_same_text_at_every_render() -> None:
    password = derive_password(KEY, "ingest", "uid-1")
    hashed = derived_hash(KEY, password, "ingest", "uid-1")
    assert bcrypt.checkpw(password.encode(), hashed.encode())
    assert not bcrypt.checkpw(b"wrong", hashed.encode())
    first = Credentials(KEY, "chengdu").render(FLEETS)
    assert first == Credentials(KEY, "chengdu").render(FLEETS)  # an operator restart writes nothing
    assert first != Credentials(KEY, "chengdu").render({"jinjiang-pressure": FLEETS["jinjiang-pressure"]})


def test_mqtt_fleets_get_a_terminal_identity_and_http_fleets_do_not() -> None:
    users = {u.name for u in Credentials(KEY, "chengdu").users(FLEETS)}
    assert users == {"citynerve-operator", "jinjiang-pressure", "jinjiang-pressure-ingest",
                     "chunxi-crowd-ingest"}
    data = Credentials(KEY, "chengdu").secret_data("mqtt", FLEETS["jinjiang-pressure"])
    decoded = {k: base64.b64decode(v).decode() for k, v in data.items()}
    assert decoded == {"username": "jinjiang-pressure", "password": derive_password(KEY, "mqtt", "uid-1")}


def scoring(credentials: Credentials, *scenarios: ScenarioIdentity) -> Credentials:
    credentials.scenarios.update({s.uid: s for s in scenarios})
    return credentials


def test_a_scenarios_scoring_identity_is_rendered_the_same_after_a_restart() -> None:
    live = ScenarioIdentity("city", "uid-s", ("jinjiang-pressure", "chunxi-crowd"))
    first = scoring(Credentials(KEY, "chengdu"), live).render(FLEETS)
    assert first == scoring(Credentials(KEY, "chengdu"), live).render(FLEETS)  # a restart writes nothing
    assert first != Credentials(KEY, "chengdu").render(FLEETS)
    user = names.scoring_identity("uid-s")
    [identity] = [u for u in scoring(Credentials(KEY, "chengdu"), live).users(FLEETS) if u.name == user]
    assert bcrypt.checkpw(derive_password(KEY, "scoring", "uid-s").encode(), identity.password_hash.encode())
    assert f"$JS.API.CONSUMER.MSG.NEXT.{names.windows_stream('chunxi-crowd')}.{user}" in identity.publish
    # a scenario gone: its identity leaves the rendered users, and its cached hash goes too
    credentials = scoring(Credentials(KEY, "chengdu"), live)
    credentials.users(FLEETS)
    del credentials.scenarios["uid-s"]
    assert credentials.render(FLEETS) == Credentials(KEY, "chengdu").render(FLEETS)
    assert ("scoring", "uid-s") not in credentials._hashes


def test_a_scenario_may_read_only_its_own_namespaces_fleets() -> None:
    elsewhere = ScenarioIdentity("other", "uid-o", ("jinjiang-pressure", "no-such-fleet"))
    credentials = scoring(Credentials(KEY, "chengdu"), elsewhere,
                          ScenarioIdentity("city", "uid-s", ("jinjiang-pressure", "no-such-fleet")))
    assert credentials.scoring_fleets("uid-o", FLEETS) == ()  # a namesake fleet of namespace city
    assert credentials.scoring_fleets("uid-s", FLEETS) == ("jinjiang-pressure",)
    [nothing] = [u for u in credentials.users(FLEETS) if u.name == names.scoring_identity("uid-o")]
    assert nothing.publish == ()  # rendered as deny-all


def test_scoring_access_never_shows_its_password() -> None:
    access = ScoringAccess(url="nats://broker:4222", user="scoring-uid-s", password="s3cret-pw",
                           consumer="scoring-uid-s", fleets=("jinjiang-pressure",))
    assert "s3cret-pw" not in repr(access)


def test_a_real_broker_takes_the_derived_passwords_and_refuses_others(tmp_path: Path) -> None:
    credentials = Credentials(KEY, "chengdu")
    broker = LocalBroker(tmp_path / "broker", "chengdu", nats_server=toolchain.binary("nats-server"))
    broker.start(credentials.users(FLEETS))

    async def attempt(user: str, password: str) -> bool:
        try:
            nc = await nats.connect(broker.url, user=user, password=password, allow_reconnect=False,
                                    connect_timeout=5, max_reconnect_attempts=0)
        except Exception:  # noqa: BLE001 - refused is what some attempts should be
            return False
        await nc.close()
        return True

    async def check() -> list[bool]:
        return [
            await attempt("citynerve-operator", derive_password(KEY, "operator", "operator")),
            await attempt("jinjiang-pressure-ingest", derive_password(KEY, "ingest", "uid-1")),
            await attempt("jinjiang-pressure", derive_password(KEY, "mqtt", "uid-1")),
            # another fleet's password, another key's password
            await attempt("jinjiang-pressure-ingest", derive_password(KEY, "ingest", "uid-2")),
            await attempt("citynerve-operator", derive_password(b"y" * 32, "operator", "operator")),
            await attempt("chunxi-crowd", derive_password(KEY, "mqtt", "uid-2")),  # HTTP fleet: no terminals
        ]

    try:
        assert asyncio.run(check()) == [True, True, True, False, False, False]
        assert names.readings_topic("chengdu", "jinjiang-pressure") == "readings/chengdu/jinjiang-pressure"
    finally:
        broker.stop()
