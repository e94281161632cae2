"""``citynerve operator city``: run a city's operator in the foreground."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from citynerve.observability import configure_telemetry
from citynerve.observability.logs import configure_logging
from citynerve.operators import images
from citynerve.operators.city.broker import BrokerOptions
from citynerve.operators.city.config import AlertPolicy, CityOptions
from citynerve.operators.city.handlers import build_registry
from citynerve.operators.city.rbac import IDENTITY_SECRET
from citynerve.operators.federation.agent import CityAgent, agent_config
from citynerve.operators.runtime import KubeTarget, OperatorOptions, run_until_signal, scratch_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="citynerve operator city", description=__doc__)
    parser.add_argument(
        "--kubeconfig",
        type=Path,
        default=None,
        help="kubeconfig of the city cluster (default: $KUBECONFIG, ~/.kube/config, else in-cluster)",
    )
    parser.add_argument("--context", default=None, help="context in the kubeconfig")
    parser.add_argument(
        "--namespace",
        action="append",
        default=[],
        dest="namespaces",
        help="namespace to watch (repeatable); none: cluster-wide",
    )
    # No default: an operator started without it would join the federation as another city.
    parser.add_argument(
        "--city", required=True,
        help="name of this city, as its City on the hub is named (the chart sets it)"
    )
    parser.add_argument(
        "--mlflow-url", default=None, help="MLflow tracking server AnalyticsModels resolve against"
    )
    parser.add_argument(
        "--workload-mode",
        choices=("local", "kuberay"),
        default="local",
        help="run scenarios on a local Ray cluster or as KubeRay RayJobs (default: %(default)s)",
    )
    parser.add_argument(
        "--image",
        default=images.reference(),
        help="the image of the fleets' ingest Deployments and the scenarios' RayJobs; the chart passes "
        "its own (default: %(default)s)",
    )
    broker = parser.add_argument_group("data plane", "the city broker the fleets' readings travel on")
    broker.add_argument("--broker-url", default=None,
                        help="NATS URL of the city broker, as the operator and the fleets' workers reach it "
                        "(the chart sets it); without it every fleet reports NoBroker")
    broker.add_argument("--broker-key-file", type=Path, default=None,
                        help="file holding the key every broker password derives from (the chart mounts "
                        "Secret citynerve-broker-key)")
    broker.add_argument("--broker-namespace", default=os.environ.get("POD_NAMESPACE"),
                        help="namespace of Secret citynerve-broker-auth, the broker's users "
                        "(default: $POD_NAMESPACE)")
    broker.add_argument("--history-storage", default="1Gi",
                        help="size of each fleet's window history volume (default: %(default)s)")
    broker.add_argument("--history-storage-class", default=None,
                        help="StorageClass of those volumes (default: the cluster's default)")
    parser.add_argument("--peering", default=None, help="Kopf peering name (default: standalone)")
    parser.add_argument(
        "--resync-seconds",
        type=float,
        default=30.0,
        help="seconds between full resyncs (default: %(default)s)",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    parser.add_argument("--log-format", choices=("text", "json"), default=None,
                        help="a line of text or a JSON object per event "
                             "(default: $CITYNERVE_LOG_FORMAT, else text)")
    parser.add_argument(
        "--agent-config",
        type=Path,
        default=os.environ.get("CITYNERVE_AGENT_CONFIG"),
        help="the city chart's agent.json: also run the federation agent (default: $CITYNERVE_AGENT_CONFIG)",
    )
    parser.add_argument(
        "--hub-bootstrap-token-file",
        type=Path,
        default=os.environ.get("CITYNERVE_HUB_BOOTSTRAP_TOKEN_FILE"),
        help="the hub bootstrap token the agent joins with (default: $CITYNERVE_HUB_BOOTSTRAP_TOKEN_FILE)",
    )
    alerts = parser.add_argument_group("alert routes", "which addresses alert webhooks may be delivered to")
    alerts.add_argument(
        "--alert-secret",
        action="append",
        default=[],
        dest="alert_secrets",
        metavar="NAME",
        help="a Secret alert routes may name in secretRef (repeatable; the city chart's "
        "alerts.secretNames, the only Secrets its RBAC lets the operator read); a route naming "
        "another is refused",
    )
    alerts.add_argument(
        "--alerts-allow-loopback",
        action="store_true",
        help="deliver to loopback addresses (127.0.0.0/8, ::1), e.g. a receiver on this machine",
    )
    alerts.add_argument(
        "--alerts-allow-private-networks",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="deliver to private-network addresses (10/8, 172.16/12, 192.168/16, fc00::/7 …) "
        "(default: %(default)s)",
    )
    alerts.add_argument(
        "--alerts-allow-link-local",
        action="store_true",
        help="deliver to link-local and cloud-metadata addresses (169.254.0.0/16, fe80::/10, "
        "fd00:ec2::254, 100.100.100.200); never needed by a real receiver",
    )
    return parser


def parse_options(argv: list[str]) -> tuple[OperatorOptions, CityOptions]:
    options, city, _ = _parse(argv)
    return options, city


def _parse(argv: list[str]) -> tuple[OperatorOptions, CityOptions, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if IDENTITY_SECRET in args.alert_secrets:
        parser.error(f"--alert-secret {IDENTITY_SECRET}: that is the agent's key, never an alert route's")
    options = OperatorOptions(
        name=f"city-{args.city}",
        target=KubeTarget(args.kubeconfig, args.context),
        namespaces=tuple(args.namespaces),
        peering=args.peering,
    )
    broker = None
    if args.broker_url:
        if not args.broker_key_file or not args.broker_namespace:
            parser.error("--broker-url needs --broker-key-file and --broker-namespace (or $POD_NAMESPACE)")
        broker = BrokerOptions(args.broker_url, args.broker_key_file, args.broker_namespace)
    city = CityOptions(
        broker=broker,
        history_storage=args.history_storage,
        history_storage_class=args.history_storage_class,
        city=args.city,
        mlflow_url=args.mlflow_url,
        workload_mode=args.workload_mode,
        image=args.image,
        resync_seconds=args.resync_seconds,
        alert_secrets=tuple(dict.fromkeys(args.alert_secrets)),
        alert_policy=AlertPolicy(
            allow_loopback=args.alerts_allow_loopback,
            allow_private_networks=args.alerts_allow_private_networks,
            allow_link_local=args.alerts_allow_link_local,
        ),
    )
    configure_logging(args.log_level, args.log_format)
    return options, city, args


def main(argv: list[str]) -> int:
    options, city, args = _parse(argv)
    configure_telemetry("citynerve-city-operator", city=city.city)
    agent = None
    if args.agent_config:
        if not args.hub_bootstrap_token_file:
            raise SystemExit("--agent-config needs --hub-bootstrap-token-file (the hub bootstrap token)")
        rendered = json.loads(Path(args.agent_config).read_text())
        token = Path(args.hub_bootstrap_token_file).read_text().strip()
        agent = CityAgent(agent_config(rendered, token, options.target, scratch_dir("agent"))).start()
    try:
        return run_until_signal(options, lambda o: build_registry(o, city))
    finally:
        if agent is not None:
            agent.stop()
