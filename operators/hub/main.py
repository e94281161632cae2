"""``citynerve operator hub``: the hub operator in the foreground."""

from __future__ import annotations

import argparse
from pathlib import Path

from citynerve.observability import configure_telemetry
from citynerve.observability.logs import configure_logging
from citynerve.operators.hub.handlers import build_registry
from citynerve.operators.runtime import KubeTarget, OperatorOptions, run_until_signal


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="citynerve operator hub", description=__doc__)
    parser.add_argument("--kubeconfig", type=Path, default=None,
                        help="kubeconfig of the hub (default: $KUBECONFIG, ~/.kube/config, else in-cluster)")
    parser.add_argument("--context", default=None, help="context in --kubeconfig")
    parser.add_argument("--check-interval", type=float, default=5.0,
                        help="seconds between checks of each city's heartbeat (default: %(default)s)")
    parser.add_argument("--mlflow-url", default=None,
                        help="MLflow tracking server ModelPromotions read and move aliases on "
                             "(default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--mlflow-users", type=Path, default=None,
                        help="folder of files named by MLflow user, each holding its password: the "
                             "registry identities this operator (MLflow's admin) creates and keeps")
    parser.add_argument("--peering", default=None,
                        help="Kopf peering name, so that two replicas never both act")
    parser.add_argument("--log-format", choices=("text", "json"), default=None,
                        help="a line of text or a JSON object per event "
                             "(default: $CITYNERVE_LOG_FORMAT, else text)")
    args = parser.parse_args(argv)
    configure_logging("INFO", args.log_format)
    configure_telemetry("citynerve-hub-operator", cluster=args.context or "in-cluster")
    options = OperatorOptions(name="hub", target=KubeTarget(args.kubeconfig, args.context),
                              peering=args.peering)
    return run_until_signal(
        options, lambda o: build_registry(o, args.check_interval, args.mlflow_url, args.mlflow_users))
