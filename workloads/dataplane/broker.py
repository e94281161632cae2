"""A city's broker: nats-server with JetStream and its MQTT listener, its identities and its supervisor.

One nats-server per city carries the data plane (see ``names``). Its configuration comes in two
parts: the server config (listeners, JetStream store, the include of the auth file) is static,
and the auth file (accounts, users, permissions) changes whenever fleets come and go. The auth
file is rendered here from :class:`BrokerUser` values; in a cluster the city operator writes it
into a Secret, the kubelet refreshes the mounted copy, and the supervisor (``python -m
citynerve.workloads.dataplane.broker``) makes nats-server reload it. Locally, :class:`LocalBroker`
runs the same supervisor in a folder.

Every identity gets the least it needs; the subjects are the ones ``names`` defines. The
permissions were each checked against a real server with nats-py and paho-mqtt
(``tests/test_dataplane_broker.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import bcrypt
from citynerve.workloads.dataplane.names import (
    FLEETS_BUCKET,
    HISTORY_CONSUMER,
    QUARANTINE_PREFIX,
    READINGS_PREFIX,
    WINDOWS_PREFIX,
    WORKER_CONSUMER,
    inbox_prefix,
    quarantine_subject,
    readings_stream,
    readings_subject,
    windows_stream,
    windows_subject,
)

CITY_ACCOUNT = "CITY"  # the one account every identity of the city lives in (JetStream enabled)
SYSTEM_ACCOUNT = "SYS"  # nats-server's own account; its one user can never log in
OPERATOR_USER = "citynerve-operator"
_SYSTEM_USER = "citynerve-system"
# Not a bcrypt hash any password matches (too short to be one), so the system user is locked out;
# its existence alone makes the server demand credentials from every client.
_LOCKED_OUT = "$2b$11$locked-out"
BCRYPT_ROUNDS = 11
INBOX = "_INBOX.>"
POLL_SECONDS = 2.0  # how often the supervisor looks at the auth file


@dataclass(frozen=True)
class BrokerUser:
    """One identity of the city account and the subjects it may use."""

    name: str
    password_hash: str  # bcrypt ($2b$…): nats-server compares passwords against it
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def hash_password(password: str) -> str:
    """The bcrypt hash nats-server is given instead of the password."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(BCRYPT_ROUNDS)).decode()


def new_password() -> str:
    return secrets.token_urlsafe(24)


def operator_user(password_hash: str) -> BrokerUser:
    """The city operator: manages streams, consumers and KV buckets, and may read and replay data."""
    data = (f"{READINGS_PREFIX}.>", f"{WINDOWS_PREFIX}.>", f"{QUARANTINE_PREFIX}.>")
    return BrokerUser(
        name=OPERATOR_USER, password_hash=password_hash,
        publish=("$JS.API.>", "$JS.ACK.>", "$KV.>", *data),
        subscribe=(INBOX, "$KV.>", *data),
    )


def terminal_user(city: str, fleet: str, password_hash: str) -> BrokerUser:
    """A fleet's terminals (MQTT, username = the fleet's name): publish their fleet's readings, nothing else.

    The MQTT listener needs no extra permission for a QoS-1 publisher: its sessions and
    in-flight messages live in streams the server's own internal client writes.
    """
    return BrokerUser(name=fleet, password_hash=password_hash,
                      publish=(readings_subject(city, fleet),), subscribe=())


def ingest_user(city: str, fleet: str, password_hash: str) -> BrokerUser:
    """A fleet's stream worker (and its HTTP gateway): its own readings, windows, quarantine and KV keys."""
    stream, windows = readings_stream(fleet), windows_stream(fleet)
    kv_stream = f"KV_{FLEETS_BUCKET}"
    kv_keys = f"$KV.{FLEETS_BUCKET}.{fleet}.>"
    return BrokerUser(
        name=f"{fleet}-ingest", password_hash=password_hash,
        publish=(
            readings_subject(city, fleet),
            windows_subject(city, fleet),
            quarantine_subject(city, fleet),
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{WORKER_CONSUMER}",
            f"$JS.API.CONSUMER.INFO.{stream}.{WORKER_CONSUMER}",
            # after a reconnect, what it held unacknowledged is delivered again at once
            f"$JS.API.CONSUMER.RESET.{stream}.{WORKER_CONSUMER}",
            f"$JS.API.STREAM.INFO.{stream}",
            f"$JS.ACK.{stream}.{WORKER_CONSUMER}.>",
            kv_keys,
            f"$JS.API.DIRECT.GET.{kv_stream}.{kv_keys}",
            f"$JS.API.STREAM.INFO.{kv_stream}",
            # its history: the fleet's windows, through the consumer the operator made
            f"$JS.API.CONSUMER.MSG.NEXT.{windows}.{HISTORY_CONSUMER}",
            f"$JS.API.CONSUMER.INFO.{windows}.{HISTORY_CONSUMER}",
            f"$JS.API.STREAM.INFO.{windows}",
            # its history's acks only: another consumer of the windows (a scenario's) is not its to ack
            f"$JS.ACK.{windows}.{HISTORY_CONSUMER}.>",
        ),
        subscribe=(f"{inbox_prefix(f'{fleet}-ingest')}.>",),  # replies to it alone, not every client's
    )


def scoring_user(city: str, user: str, fleets: Sequence[str], password_hash: str) -> BrokerUser:
    """A Scenario's live scoring workload (``user`` = ``names.scoring_identity(uid)``): reads and
    acknowledges its fleets' windows through its own durable consumer on each windows stream,
    which the city operator made. Nothing else: no consumer of its own making, no publish of data.

    The subjects it may use name streams and consumers, not the city's windows subjects; the
    city and fleets are still checked to be subject tokens (``ValueError`` otherwise).
    """
    publish: list[str] = []
    for fleet in fleets:
        windows_subject(city, fleet)
        windows = windows_stream(fleet)
        publish += [
            f"$JS.API.CONSUMER.MSG.NEXT.{windows}.{user}",
            f"$JS.API.CONSUMER.INFO.{windows}.{user}",
            # at start: what the workload before it held unacknowledged (its context) comes back at once
            f"$JS.API.CONSUMER.RESET.{windows}.{user}",
            f"$JS.API.STREAM.INFO.{windows}",
            f"$JS.ACK.{windows}.{user}.>",
        ]
    return BrokerUser(name=user, password_hash=password_hash, publish=tuple(publish),
                      subscribe=(f"{inbox_prefix(user)}.>",))


def _conf_list(subjects: Sequence[str]) -> str:
    # Quoted, so that a leading '$' is a subject character and not a config variable.
    return "[" + ", ".join(json.dumps(s) for s in subjects) + "]"


def _permission(subjects: Sequence[str]) -> str:
    # An empty allow list would mean "no restriction": nothing allowed is said as deny-all.
    return f"{{allow: {_conf_list(subjects)}}}" if subjects else '{deny: [">"]}'


def render_auth(users: Sequence[BrokerUser]) -> str:
    """The auth fragment the server config includes: the city account and the system account.

    With no users it still demands credentials nobody has: the system account's user is locked
    out, and a server with any user defined refuses anonymous clients.
    """
    names = [u.name for u in users]
    duplicates = sorted({n for n in names if names.count(n) > 1} | ({_SYSTEM_USER} & set(names)))
    if duplicates:
        msg = f"broker user names must be unique; {', '.join(duplicates)} is given twice or reserved"
        raise ValueError(msg)
    lines = ["accounts {", f"  {CITY_ACCOUNT}: {{", "    jetstream: enabled", "    users: ["]
    for user in users:
        lines += [
            f"      {{user: {json.dumps(user.name)}, password: {json.dumps(user.password_hash)},",
            f"       permissions: {{publish: {_permission(user.publish)},"
            f" subscribe: {_permission(user.subscribe)}}}}}",
        ]
    lines += ["    ]", "  }",
              f"  {SYSTEM_ACCOUNT}: {{users: [{{user: {json.dumps(_SYSTEM_USER)},"
              f" password: {json.dumps(_LOCKED_OUT)}}}]}}",
              "}", f"system_account: {SYSTEM_ACCOUNT}", ""]
    return "\n".join(lines)


def render_server_config(*, server_name: str, host: str, client_port: int, mqtt_port: int,
                         monitor_port: int, store_dir: str, auth_file: str,
                         max_payload: int = 8 * 1024 * 1024) -> str:
    """The static server config: listeners, JetStream's store, and the include of the auth file.

    nats-server resolves ``auth_file`` against the folder of the config file, even when it is
    absolute: give it relative to that folder.
    """
    return "\n".join([
        f"server_name: {json.dumps(server_name)}",
        f"listen: {json.dumps(f'{host}:{client_port}')}",
        f"http: {json.dumps(f'{host}:{monitor_port}')}",
        f"max_payload: {max_payload}",
        f"jetstream {{ store_dir: {json.dumps(store_dir)} }}",
        f"mqtt {{ listen: {json.dumps(f'{host}:{mqtt_port}')} }}",
        f"include {json.dumps(auth_file)}",
        "",
    ])


# -- the supervisor -------------------------------------------------------------------------------
def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _write_atomically(path: Path, text: str, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)


class _AuthSync:
    """Keeps the auth file the server config includes in step with its source.

    The source may be missing (a Secret the city operator has not written yet): the included
    file then denies everyone. When source and include are one file, a missing one is created.
    """

    def __init__(self, source: Path, include: Path) -> None:
        self.source = source
        self.include = include
        self._seen: str | None = ""  # no digest is empty: the first sync always writes

    def sync(self) -> bool:
        """Bring the included file up to date; True if its content changed."""
        digest = _digest(self.source)
        if digest == self._seen:
            return False
        if digest is None:
            deny_all = render_auth(())
            changed = _digest(self.include) != hashlib.sha256(deny_all.encode()).hexdigest()
            if changed:
                _write_atomically(self.include, deny_all)
            self._seen = _digest(self.source)  # still None, unless the include is the source
            return changed
        self._seen = digest
        if self.include != self.source:
            _write_atomically(self.include, self.source.read_text())
        return True


def supervise(nats_server: str, config: Path, auth: _AuthSync) -> int:
    """Run nats-server; reload it when the auth file changes; forward SIGTERM/SIGINT; return its code."""
    auth.sync()
    child = subprocess.Popen([nats_server, "-c", str(config)])
    # Blocked only now, so that the child does not inherit the mask; from here on these signals
    # wait in the queue for sigtimedwait below.
    handled = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, handled)
    while True:
        received = signal.sigtimedwait(handled, POLL_SECONDS)
        code = child.poll()
        if code is not None:
            return code if code >= 0 else 128 - code
        if received is None or received.si_signo == signal.SIGHUP:
            if auth.sync():
                child.send_signal(signal.SIGHUP)
        elif received.si_signo in (signal.SIGTERM, signal.SIGINT):
            child.send_signal(received.si_signo)


def argument_parser() -> argparse.ArgumentParser:
    """The supervisor's command line (the chart's StatefulSet passes exactly these)."""
    parser = argparse.ArgumentParser(
        prog="python -m citynerve.workloads.dataplane.broker",
        description="Run a city's nats-server and reload it whenever its auth file changes.")
    parser.add_argument("--config", type=Path, required=True, help="the server config (it includes the auth)")
    parser.add_argument("--auth-file", type=Path, required=True,
                        help="the auth file as written by the city operator (may not exist yet)")
    parser.add_argument("--auth-include", type=Path,
                        help="the file the server config includes, kept as a copy of --auth-file "
                             "(default: --auth-file itself; set it when that is read-only)")
    parser.add_argument("--nats-server", default="nats-server", help="the nats-server binary")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = argument_parser().parse_args(argv)
    auth = _AuthSync(args.auth_file, args.auth_include or args.auth_file)
    return supervise(args.nats_server, args.config, auth)


# -- a broker in a folder -------------------------------------------------------------------------
@dataclass(frozen=True)
class BrokerPorts:
    client: int
    mqtt: int
    monitor: int


def free_ports(host: str, count: int) -> list[int]:
    """Ports nothing listens on right now, all different (each socket stays bound until all are)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _get_json(url: str, timeout: float = 2.0) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - our own http URL
        body: dict[str, object] = json.load(resp)
        return body


class LocalBroker:
    """The supervisor and its nats-server in a folder: the local federation's, a test's, a bench's.

    The folder holds the server config, the auth file, the JetStream store, the log and
    ``broker.json`` (ports and the supervisor's process id), so the broker is found again by
    another process and keeps its ports and data across restarts.
    """

    def __init__(self, folder: Path, server_name: str, host: str = "127.0.0.1",
                 ports: BrokerPorts | None = None, *, nats_server: Path | None = None) -> None:
        self.folder = folder
        self.server_name = server_name
        self.host = host
        self.nats_server = str(nats_server) if nats_server else "nats-server"
        state = self._state()
        if ports is None:
            saved = state.get("ports")
            ports = BrokerPorts(**saved) if isinstance(saved, dict) else BrokerPorts(*free_ports(host, 3))
        self.ports = ports

    # -- files ---------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.folder / "broker.json"

    @property
    def config_file(self) -> Path:
        return self.folder / "nats.conf"

    @property
    def auth_file(self) -> Path:
        return self.folder / "auth.conf"

    @property
    def log_file(self) -> Path:
        return self.folder / "broker.log"

    def _state(self) -> dict[str, object]:
        try:
            state: dict[str, object] = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return state

    def _save(self, pid: int | None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        ports = {"client": self.ports.client, "mqtt": self.ports.mqtt, "monitor": self.ports.monitor}
        _write_atomically(self.state_file, json.dumps({"ports": ports, "pid": pid}), mode=0o644)

    @property
    def pid(self) -> int | None:
        """The supervisor's process id, as the last start wrote it (by this process or another)."""
        pid = self._state().get("pid")
        return pid if isinstance(pid, int) else None

    # -- addresses -----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.ports.client}"

    @property
    def mqtt_host(self) -> str:
        return self.host

    @property
    def mqtt_port(self) -> int:
        return self.ports.mqtt

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.ports.monitor}"

    # -- lifecycle -----------------------------------------------------------------------------
    def is_running(self) -> bool:
        pid = self.pid
        if pid is None:
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        zombie = stat.rsplit(")", 1)[1].split()[0] == "Z"
        return not zombie and str(self.config_file).encode() in cmdline

    def start(self, users: Sequence[BrokerUser] = (), timeout: float = 30.0) -> None:
        """Write the config and the auth for ``users``, start, and return once JetStream is up."""
        if self.is_running():
            msg = f"the broker in {self.folder} is already running (pid {self.pid})"
            raise RuntimeError(msg)
        (self.folder / "jetstream").mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(render_server_config(
            server_name=self.server_name, host=self.host, client_port=self.ports.client,
            mqtt_port=self.ports.mqtt, monitor_port=self.ports.monitor,
            store_dir=str(self.folder / "jetstream"), auth_file=self.auth_file.name))
        _write_atomically(self.auth_file, render_auth(users))
        self._spawn(timeout)

    def _spawn(self, timeout: float) -> None:
        args = [sys.executable, "-m", "citynerve.workloads.dataplane.broker",
                "--config", str(self.config_file), "--auth-file", str(self.auth_file),
                "--nats-server", self.nats_server]
        with self.log_file.open("ab") as log:
            child = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, cwd=self.folder)
        self._save(child.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if child.poll() is not None:
                msg = f"the broker in {self.folder} exited with {child.returncode}:\n{self._log_tail()}"
                raise RuntimeError(msg)
            if self.is_healthy():
                return
            time.sleep(0.05)
        self.kill()
        msg = f"the broker in {self.folder} was not healthy after {timeout:.0f} s:\n{self._log_tail()}"
        raise TimeoutError(msg)

    def is_healthy(self) -> bool:
        """The monitor's health check, JetStream included."""
        try:
            _get_json(f"{self.monitor_url}/healthz?js-enabled-only=true", timeout=1.0)
        except (OSError, ValueError):
            return False
        return True

    def _load_time(self) -> object:
        return _get_json(f"{self.monitor_url}/varz").get("config_load_time")

    def set_users(self, users: Sequence[BrokerUser], timeout: float = 30.0) -> None:
        """Replace the users without a restart; return once the server runs with them.

        A broker that is not running only gets the file: its next start (``restart``) uses it.
        """
        if not self.is_running():
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_atomically(self.auth_file, render_auth(users))
            return
        before = self._load_time()
        _write_atomically(self.auth_file, render_auth(users))
        pid = self.pid
        if pid is not None:
            os.kill(pid, signal.SIGHUP)  # the supervisor would see the change within POLL_SECONDS
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._load_time() != before:
                return
            time.sleep(0.05)
        msg = (f"the broker in {self.folder} did not reload its users within {timeout:.0f} s:\n"
               f"{self._log_tail()}")
        raise TimeoutError(msg)

    def _signal_group(self, sig: signal.Signals, timeout: float) -> bool:
        pid = self.pid
        if pid is None or not self.is_running():
            return True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if not self.is_running():
                return True
            time.sleep(0.05)
        return False

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (nats-server flushes JetStream and exits), SIGKILL if it lingers."""
        if not self._signal_group(signal.SIGTERM, timeout):
            self._signal_group(signal.SIGKILL, 5.0)
        if self.pid is not None:
            self._save(None)

    def kill(self) -> None:
        """SIGKILL the supervisor and nats-server at once: a crash, for tests."""
        self._signal_group(signal.SIGKILL, 5.0)
        if self.pid is not None:
            self._save(None)

    def restart(self, timeout: float = 30.0) -> None:
        """Stop if running and start again with the same ports, users and JetStream data."""
        self.stop()
        self._spawn(timeout)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


if __name__ == "__main__":
    sys.exit(main())
