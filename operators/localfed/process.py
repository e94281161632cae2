"""Background processes of the local federation, findable again from another process.

A process is started in its own session (so a signal reaches its children too), its output
appended to a log file, and it is known afterwards by its id plus the binary it runs: an id
the kernel has since given to another program is never signalled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _is_zombie_or_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


class ProcessTable:
    """The processes one owner (a cluster, the MLflow server) started, by role."""

    def __init__(self, pids: dict[str, int] | None = None) -> None:
        self.pids: dict[str, int] = dict(pids or {})
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    def is_running(self, role: str, binary: str) -> bool:
        pid = self.pids.get(role)
        if not pid:
            return False
        child = self._children.get(role)
        if child is not None:
            return child.poll() is None
        return binary in cmdline(pid) and not _is_zombie_or_gone(pid)

    def start(self, role: str, args: list[str], log: Path, cwd: Path,
              env: dict[str, str] | None = None) -> int:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            out.write(f"--- start {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
            out.flush()
            child = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=cwd, env=env,
            )
        self._children[role] = child
        self.pids[role] = child.pid
        return child.pid

    def stop(self, role: str, binary: str, timeout: float = 15.0) -> None:
        """SIGTERM the process group, then SIGKILL if it has not gone after ``timeout``."""
        pid = self.pids.pop(role, None)
        child = self._children.pop(role, None)
        if pid is None:
            return
        if child is None and binary not in cmdline(pid):
            return  # the id now belongs to some other process, or none
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            if _wait_gone(pid, child, wait):
                break
        if child is not None:
            child.wait(timeout=5)


def _wait_gone(pid: int, child: subprocess.Popen[bytes] | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None:
            if child.poll() is not None:
                return True
        elif _is_zombie_or_gone(pid):
            return True
        time.sleep(0.05)
    return False


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
