"""Local federation figures: cold build time, warm start, resident memory.

Baseline (same process): one control plane started alone. The figure of interest is the
warm start of hub + 2 cities (aim ≤ 20 s) and what the three cost in resident memory.
Last line: one JSON object of the figures.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from citynerve.operators.localfed import toolchain
from citynerve.operators.localfed.cluster import LocalCluster
from citynerve.operators.localfed.federation import LocalFederation


def rss_mb(pids: list[int]) -> float:
    total_kb = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024


def main() -> None:
    toolchain.ensure()
    with tempfile.TemporaryDirectory(prefix="cn-bench-fed-") as tmp:
        single = LocalCluster("single", Path(tmp) / "single")
        start = time.monotonic()
        single.start()
        single_s = time.monotonic() - start
        single_mb = rss_mb(list(single.pids.values()))
        single.stop()

        federation = LocalFederation(Path(tmp) / "fed")
        start = time.monotonic()
        federation.up()
        warm_s = time.monotonic() - start
        time.sleep(5)  # let the controllers settle before measuring memory
        per_component: dict[str, float] = {}
        for cluster in federation.clusters.values():
            for comp, pid in cluster.pids.items():
                per_component[comp] = per_component.get(comp, 0.0) + rss_mb([pid])
        total_mb = rss_mb(federation.pids())
        federation.down()

    builds = toolchain.recorded_build_seconds()
    print(f"one control plane alone: {single_s:.1f} s, {single_mb:.0f} MB")
    print(f"hub + 2 cities, warm:    {warm_s:.1f} s, {total_mb:.0f} MB")
    for comp, mb in sorted(per_component.items()):
        print(f"  {comp:<24} {mb:6.0f} MB (3 clusters)")
    for comp, secs in builds.items():
        print(f"  cold build {comp:<13} {secs:6.0f} s")
    print(json.dumps({
        "warm_start_s": round(warm_s, 2),
        "single_cluster_start_s": round(single_s, 2),
        "ratio_vs_single": round(warm_s / single_s, 2),
        "rss_mb_three_control_planes": round(total_mb),
        "rss_mb_single_control_plane": round(single_mb),
        "cold_build_s": round(sum(builds.values())),
        "cold_build_s_by_component": builds,
    }))


if __name__ == "__main__":
    main()
