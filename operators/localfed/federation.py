"""The local federation: a hub and N city control planes, independent of each other; each city
also runs its broker (the hub has none: nothing publishes to one).

Used by ``citynerve dev up|down|status``, by ``make demo`` and by the e2e fixtures. Its
state folder holds one sub-folder per cluster and a merged kubeconfig with one context per
cluster (named after it), so ``kubectl --kubeconfig <state>/kubeconfig --context chengdu``
reaches Chengdu.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from citynerve.operators.localfed import toolchain
from citynerve.operators.localfed.cluster import COMPONENTS, CityBroker, LocalCluster

HUB = "hub"
DEFAULT_CITIES = ("shanghai", "chengdu")


def default_state_dir() -> Path:
    """``CITYNERVE_STATE_DIR``, else ``.citynerve/federation`` under the working folder."""
    env = os.environ.get("CITYNERVE_STATE_DIR")
    return Path(env) if env else Path.cwd() / ".citynerve" / "federation"


class LocalFederation:
    """Hub + cities on this machine. Construction is cheap; ``up`` starts what is not running."""

    def __init__(self, state_dir: Path | None = None, cities: tuple[str, ...] | None = None) -> None:
        self.state_dir = (state_dir or default_state_dir()).resolve()
        saved = self._saved_names()
        names = (HUB, *(cities or DEFAULT_CITIES)) if cities or not saved else saved
        self.clusters: dict[str, LocalCluster] = {
            name: LocalCluster(name, self.state_dir / name, with_broker=name != HUB) for name in names
        }

    def _saved_names(self) -> tuple[str, ...]:
        try:
            names = json.loads((self.state_dir / "federation.json").read_text())["clusters"]
        except (OSError, ValueError, KeyError):
            return ()
        return tuple(names)

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.clusters)

    @property
    def cities(self) -> tuple[str, ...]:
        return tuple(n for n in self.clusters if n != HUB)

    def cluster(self, name: str) -> LocalCluster:
        try:
            return self.clusters[name]
        except KeyError:
            msg = f"no cluster named {name!r} in this federation; it has {', '.join(self.clusters)}"
            raise KeyError(msg) from None

    def broker(self, city: str) -> CityBroker:
        """A city's broker (``url``, ``mqtt_port``, …) and its operator user's password."""
        return self.cluster(city).city_broker()

    def up(self) -> float:
        """Build missing binaries, start every cluster in parallel; returns seconds spent starting."""
        toolchain.ensure()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "federation.json").write_text(json.dumps({"clusters": list(self.clusters)}))
        for cluster in self.clusters.values():
            cluster.prepare()
        self._write_kubeconfig()
        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=len(self.clusters)) as pool:
            list(pool.map(lambda c: c.start(), self.clusters.values()))
        return time.monotonic() - start

    def down(self) -> None:
        with ThreadPoolExecutor(max_workers=len(self.clusters)) as pool:
            list(pool.map(lambda c: c.stop(), self.clusters.values()))

    def pids(self) -> list[int]:
        """Every component process id this federation has started and not yet stopped."""
        brokers = [c.broker.pid for c in self.clusters.values() if c.broker and c.broker.pid]
        return [pid for c in self.clusters.values() for pid in c.pids.values()] + brokers

    def running_components(self) -> list[str]:
        return [f"{c.name}/{comp}" for c in self.clusters.values()
                for comp in COMPONENTS if c.is_running(comp)] + [
                f"{c.name}/broker" for c in self.clusters.values() if c.broker and c.broker.is_running()]

    def status(self) -> list[dict[str, Any]]:
        return [c.status() for c in self.clusters.values()]

    def _write_kubeconfig(self) -> None:
        entries = [c.kubeconfig_entry() for c in self.clusters.values()]
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": HUB,
            "clusters": [e["cluster"] for e in entries],
            "users": [e["user"] for e in entries],
            "contexts": [e["context"] for e in entries],
        }
        self.kubeconfig.write_text(json.dumps(config, indent=2))
        self.kubeconfig.chmod(0o600)
