"""Shared fixtures: one local Ray for the session, and a real broker per test that needs one."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import ray
from citynerve.operators.localfed import toolchain
from citynerve.workloads.dataplane.broker import (
    BrokerUser,
    LocalBroker,
    hash_password,
    ingest_user,
    new_password,
    operator_user,
    terminal_user,
)


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


# -- the broker: a real nats-server per test ---------------------------------------------------
BROKER_CITY = "testcity"


@dataclass(frozen=True)
class FleetPasswords:
    terminal: str  # the MQTT terminals' password (username: the fleet's name)
    ingest: str  # the stream worker's password (username: ``<fleet>-ingest``)


@dataclass
class RunningBroker:
    """A started broker whose only user is the operator; ``add_fleet`` adds a fleet's identities."""

    broker: LocalBroker
    operator_password: str
    city: str = BROKER_CITY
    users: list[BrokerUser] = field(default_factory=list)

    def add_fleet(self, fleet: str) -> FleetPasswords:
        passwords = FleetPasswords(terminal=new_password(), ingest=new_password())
        self.users += [terminal_user(self.city, fleet, hash_password(passwords.terminal)),
                       ingest_user(self.city, fleet, hash_password(passwords.ingest))]
        self.broker.set_users(self.users)
        return passwords


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RunningBroker]:
    if not toolchain.COMPONENTS["nats"].is_built():
        pytest.fail("nats-server is not built: run `citynerve tools nats` (a minute, once)")
    password = new_password()
    users = [operator_user(hash_password(password))]
    local = LocalBroker(tmp_path / "broker", BROKER_CITY, nats_server=toolchain.binary("nats-server"))
    local.start(users)
    try:
        yield RunningBroker(local, password, users=users)
    finally:
        local.stop()
