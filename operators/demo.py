"""`make demo`: bring up the local federation and show that every cluster takes work.

The federation story (onboarding, propagation, detection, promotion) grows on top of this;
for now it starts hub + cities, writes a namespace and a ConfigMap into each, reads them
back, prints the clusters, and tears everything down (unless ``keep``).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from types import FrameType

from citynerve.operators.cli import cluster_table
from citynerve.operators.localfed.federation import LocalFederation
from kubernetes import client, config
from kubernetes.client.rest import ApiException

DEMO_NAMESPACE = "citynerve-demo"


def greet_cluster(kubeconfig: Path, context: str) -> str:
    """Create (or find) the demo namespace and a ConfigMap in it; return the map's city."""
    api = client.CoreV1Api(config.new_client_from_config(str(kubeconfig), context=context))
    try:
        api.create_namespace({"metadata": {"name": DEMO_NAMESPACE}})
    except ApiException as exc:
        if exc.status != 409:
            raise
    body = {"metadata": {"name": "city"}, "data": {"city": context, "greeted": time.strftime("%FT%T")}}
    try:
        api.create_namespaced_config_map(DEMO_NAMESPACE, body)
    except ApiException as exc:
        if exc.status != 409:
            raise
        api.replace_namespaced_config_map("city", DEMO_NAMESPACE, body)
    read = api.read_namespaced_config_map("city", DEMO_NAMESPACE)
    return str(read.data["city"])


def run(state_dir: Path | None = None, keep: bool = False) -> int:
    federation = LocalFederation(state_dir)

    def _interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        print("starting the local federation (hub + cities)…", flush=True)
        seconds = federation.up()
        print(f"  up in {seconds:.1f} s; kubeconfig {federation.kubeconfig}", flush=True)
        for name in federation.names:
            city = greet_cluster(federation.kubeconfig, name)
            print(f"  {name}: namespace {DEMO_NAMESPACE} and ConfigMap 'city' = {city!r}", flush=True)
        print()
        print(cluster_table(federation))
        if keep:
            print(f"\nkept running; stop with: citynerve dev down --state-dir {federation.state_dir}")
    except KeyboardInterrupt:
        print("\ninterrupted; tearing down", flush=True)
        keep = False
    finally:
        if not keep:
            federation.down()
            print("local federation stopped", flush=True)
    return 0
