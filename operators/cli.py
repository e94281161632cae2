"""The `citynerve` command: one entry point for platform teams, city IT and ML engineers."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from citynerve.operators.localfed import toolchain
from citynerve.operators.localfed.cluster import ClusterError
from citynerve.operators.localfed.federation import DEFAULT_CITIES, LocalFederation
from citynerve.operators.models_cli import add_models_commands

if TYPE_CHECKING:  # the client libraries load when a command needs a cluster (`--version` stays quick)
    from citynerve.operators.runtime import KubeTarget

DISTRIBUTION = "citynerve"
SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the checkout, when installed in place (editable)
EXIT_NO_CLUSTER = 2  # no kubeconfig, or no such context (what kubectl users expect of a usage error)


def installed_commit(source_root: Path = SOURCE_ROOT) -> str | None:
    """The commit the package was installed from, when that is cheaply known: a ``pip install
    git+…`` records it (PEP 610); an in-place install runs from the checkout (``source_root``) itself."""
    try:
        recorded = importlib.metadata.distribution(DISTRIBUTION).read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        recorded = None
    commit = (json.loads(recorded).get("vcs_info") or {}).get("commit_id") if recorded else None
    if commit:
        return str(commit)[:12]
    if not (source_root / ".git").exists():
        return None
    try:
        proc = subprocess.run(["git", "-C", str(source_root), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def version_text(source_root: Path = SOURCE_ROOT) -> str:
    """``citynerve 0.1.0`` and, when known, ``(commit 1bb005e70d44)``."""
    try:
        version = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown (not installed)"
    commit = installed_commit(source_root)
    return f"{DISTRIBUTION} {version}" + (f" (commit {commit})" if commit else "")


class PrintVersion(argparse.Action):
    """``--version``: the version is read only when asked for (reading the commit runs git)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        del namespace, values, option_string  # nothing to parse: print and exit
        print(version_text())
        parser.exit()


def context_label(target: KubeTarget) -> str:
    """How a message names the cluster a command used: its context, or the in-cluster account."""
    return f"context {target.context_name() or '(in-cluster)'}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell, like ``kubectl get``."""
    cells = [list(map(str, header)), *[list(map(str, r)) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def cluster_table(federation: LocalFederation) -> str:
    rows = [(s["name"], s["api"], s["version"], s["nodes_ready"], _broker_cell(s["broker"]))
            for s in federation.status()]
    return format_table(("CLUSTER", "API", "VERSION", "NODES READY", "BROKER (MQTT)"), rows)


def _broker_cell(broker: object) -> str:
    """A city's broker as `citynerve dev status` shows it; the hub runs none."""
    if not isinstance(broker, dict):
        return "-"
    state = "" if broker.get("running") else " (stopped)"
    return f"{broker['url']} (mqtt :{broker['mqtt']}){state}"


def _dev(args: argparse.Namespace) -> int:
    cities = tuple(args.cities.split(",")) if getattr(args, "cities", None) else None
    federation = LocalFederation(args.state_dir, cities)
    if args.dev_command == "up":
        seconds = federation.up()
        print(f"local federation up in {seconds:.1f} s; kubeconfig: {federation.kubeconfig}")
        print(cluster_table(federation))
    elif args.dev_command == "down":
        federation.down()
        print(f"local federation stopped (state kept in {federation.state_dir})")
    else:
        print(cluster_table(federation))
    return 0


def _tools(args: argparse.Namespace) -> int:
    return toolchain.main(args.components)


def _operator(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"citynerve.operators.{args.which}.main")
    code: int = module.main(args.operator_args)
    return code


def _demo(args: argparse.Namespace) -> int:
    from citynerve.operators import demo  # noqa: PLC0415 - the demo pulls in the client libraries

    return demo.run(state_dir=args.state_dir, keep=args.keep, quick=args.quick)


def _chart_command(args: argparse.Namespace) -> int:
    """``hub install|uninstall`` and ``city onboard|offboard``: the charts, through pyhelm3."""
    from citynerve.operators import helm  # noqa: PLC0415 - pyhelm3 and the client load on use
    from citynerve.operators.runtime import KubeTarget  # noqa: PLC0415

    # pyhelm3 warns of every helm command that fails, even an expected one (uninstalling a release that
    # is not there); a failure that matters is a HelmError carrying helm's own message, printed below.
    logging.getLogger("pyhelm3").setLevel(logging.ERROR)
    try:
        values = helm.read_values_file(getattr(args, "values", None))
        if args.command == "hub":
            hub = KubeTarget(args.kubeconfig, args.context)
            if args.hub_command == "install":
                release = helm.install_hub(hub, values, namespace=args.namespace)
                print(f"installed {release.name} revision {release.revision} ({release.status}) "
                      f"into {release.namespace} of {context_label(hub)}")
                print(release.notes)
            else:
                helm.uninstall_hub(hub, namespace=args.namespace)
                print(f"uninstalled {helm.HUB_RELEASE} from {args.namespace} of {context_label(hub)}; "
                      "the CRDs stay")
            return 0
        city = KubeTarget(args.kubeconfig, args.city_context, "--city-context")
        if args.city_command == "offboard":
            watched = None
            if args.hub_context:
                watched = KubeTarget(args.kubeconfig, args.hub_context, "--hub-context")
                watched.context_name()  # a wrong hub context is refused before anything is uninstalled
            helm.offboard_city(city, namespace=args.namespace)
            print(f"uninstalled {helm.CITY_RELEASE} ({args.name}) from {args.namespace} of "
                  f"{context_label(city)}; the CRDs and the SensorType catalogue stay")
            if watched is not None:
                helm.wait_until_city_offboarded(watched, args.name, timeout=args.timeout)
                print(f"City {args.name} is marked Offboarded on the hub and takes no work; it stays "
                      f"there until `kubectl delete city {args.name}`")
            return 0
        hub = KubeTarget(args.kubeconfig, args.hub_context, "--hub-context")
        release = helm.onboard_city(args.name, hub, city, values, namespace=args.namespace)
        print(f"installed {release.name} revision {release.revision} ({release.status}) for city "
              f"{args.name} into {release.namespace} of {context_label(city)}, joined to the hub "
              f"of {context_label(hub)}")
        print(release.notes)
        if args.wait_ready:
            print(f"waiting until City {args.name} is Ready on the hub …")
            helm.wait_until_city_ready(hub, args.name, timeout=args.timeout)
            print(f"City {args.name} is Ready")
    except (OSError, TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    """``hub dashboard``: the situation map, read from the hub with the caller's kubeconfig."""
    from citynerve.observability import configure_telemetry  # noqa: PLC0415
    from citynerve.observability.situation.server import run  # noqa: PLC0415
    from citynerve.operators.runtime import KubeconfigError, KubeTarget  # noqa: PLC0415

    hub = KubeTarget(args.kubeconfig, args.context)
    files = hub.kubeconfig_files()
    if not files:
        msg = "the dashboard reads the hub through a kubeconfig; pass --kubeconfig or set KUBECONFIG"
        raise KubeconfigError(msg)
    context = hub.context_name()
    configure_telemetry("citynerve-dashboard")
    return run(os.pathsep.join(map(str, files)), context, args.address, args.port)


FROM_KUBECONFIG = "(default: $KUBECONFIG, else ~/.kube/config, else the in-cluster account)"
FROM_CURRENT = "(default: the kubeconfig's current context)"


def _add_chart_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from citynerve.operators.federation.onboarding import SYSTEM_NAMESPACE  # noqa: PLC0415

    hub = sub.add_parser("hub", help="install or uninstall the hub chart (citynerve-hub)")
    hub_sub = hub.add_subparsers(dest="hub_command", required=True)
    for name, text in (("install", "install or upgrade the hub chart into the hub cluster"),
                       ("uninstall", "uninstall the hub chart (the CRDs stay)")):
        cmd = hub_sub.add_parser(name, help=text)
        cmd.add_argument("--kubeconfig", type=Path, default=None,
                         help=f"kubeconfig of the hub cluster {FROM_KUBECONFIG}")
        cmd.add_argument("--context", default=None, help=f"context of the hub cluster {FROM_CURRENT}")
        cmd.add_argument("--namespace", default=SYSTEM_NAMESPACE,
                         help="release namespace (default: %(default)s)")
        if name == "install":
            cmd.add_argument("--values", type=Path, default=None, help="a values file for the chart")
    hub.set_defaults(func=_chart_command)
    dashboard = hub_sub.add_parser("dashboard", help="serve the situation map of the hub on a local port")
    dashboard.add_argument("--kubeconfig", type=Path, default=None,
                           help=f"kubeconfig of the hub cluster {FROM_KUBECONFIG}")
    dashboard.add_argument("--context", default=None, help=f"context of the hub cluster {FROM_CURRENT}")
    dashboard.add_argument("--address", default="127.0.0.1", help="listen address (default: %(default)s)")
    dashboard.add_argument("--port", type=int, default=8080, help="port to listen on (default: %(default)s)")
    dashboard.set_defaults(func=_dashboard)

    city = sub.add_parser("city", help="onboard a city cluster to the hub, or offboard it (citynerve-city)")
    city_sub = city.add_subparsers(dest="city_command", required=True)
    for name, text in (("onboard", "install or upgrade the city chart, joined to the hub"),
                       ("offboard", "uninstall the city chart (the CRDs stay)")):
        cmd = city_sub.add_parser(name, help=text)
        cmd.add_argument("name", help="the city's name (its City on the hub)")
        cmd.add_argument("--kubeconfig", type=Path, default=None,
                         help=f"kubeconfig holding the contexts below {FROM_KUBECONFIG}")
        cmd.add_argument("--city-context", default=None, help=f"context of the city cluster {FROM_CURRENT}")
        cmd.add_argument("--namespace", default="citynerve", help="release namespace (default: %(default)s)")
        if name == "onboard":
            cmd.add_argument("--hub-context", default=None,
                             help="hub administrator's context of the hub cluster: invites the city (a "
                                  "bootstrap token good for this city only) and reads the hub's URL and CA "
                                  f"{FROM_CURRENT}")
            cmd.add_argument("--values", type=Path, default=None,
                             help="a values file; wins over what is derived from the name and the hub")
            cmd.add_argument("--wait-ready", action="store_true",
                             help="wait until the City is Ready on the hub (approve it there meanwhile)")
            cmd.add_argument("--timeout", type=float, default=600.0,
                             help="seconds --wait-ready waits (default: %(default)s)")
        else:
            cmd.add_argument("--hub-context", default=None,
                             help="context of the hub cluster: wait until it marks the City Offboarded")
            cmd.add_argument("--timeout", type=float, default=120.0,
                             help="seconds to wait for the hub (default: %(default)s)")
    city.set_defaults(func=_chart_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="citynerve", description=__doc__)
    parser.add_argument("--version", action=PrintVersion,
                        help="print the package version (and its commit, from a checkout) and exit")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error, not only its one-line message")
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="the local federation of real control planes on this machine")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True)
    for name, text in (("up", "build what is missing and start hub + cities"),
                       ("down", "stop every process of the local federation"),
                       ("status", "show each cluster's API URL, version and Ready nodes")):
        cmd = dev_sub.add_parser(name, help=text)
        cmd.add_argument("--state-dir", type=Path, default=None,
                         help="where the clusters keep their data (default: .citynerve/federation)")
        if name == "up":
            cmd.add_argument("--cities", default=",".join(DEFAULT_CITIES),
                             help="comma-separated city cluster names (default: %(default)s)")
    dev.set_defaults(func=_dev)

    tools = sub.add_parser("tools", help="build the pinned Kubernetes, etcd, kwok and helm binaries")
    tools.add_argument("components", nargs="*", default=list(toolchain.DEFAULT_COMPONENTS))
    tools.set_defaults(func=_tools)

    operator = sub.add_parser("operator", help="run an operator in the foreground (hub or city)")
    operator.add_argument("which", choices=("hub", "city"))
    operator.add_argument("operator_args", nargs=argparse.REMAINDER,
                          help="the operator's own options; see `citynerve operator city --help`")
    operator.set_defaults(func=_operator)

    demo = sub.add_parser("demo", help="run the federation story on the local federation")
    demo.add_argument("--state-dir", type=Path, default=None)
    demo.add_argument("--keep", action="store_true", help="leave the federation running afterwards")
    demo.add_argument("--quick", action="store_true",
                      help="a shorter story (shorter heartbeat timeout and cut-off), as the tests run it")
    demo.set_defaults(func=_demo)

    _add_chart_commands(sub)
    add_models_commands(sub)  # `citynerve models train|evaluate|promote` (models engineer)
    return parser


def api_error_text(exc: Exception) -> str:
    """One line for what the Kubernetes client met: the API server's refusal, or no server at all."""
    from kubernetes.client.exceptions import ApiException  # noqa: PLC0415

    if isinstance(exc, ApiException):
        try:
            said = json.loads(exc.body or "{}").get("message") or ""
        except ValueError:
            said = ""
        said = " ".join(str(said or exc.body or "").split())
        return f"the API server refused the request ({exc.status} {exc.reason}){': ' + said if said else ''}"
    reason = " ".join(str(getattr(exc, "reason", None) or exc).split())
    return (f"cannot reach the API server ({reason}); check the kubeconfig's server and context, and that "
            "the cluster is up")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import urllib3  # noqa: PLC0415 - loaded with the client anyway
    from citynerve.operators.runtime import KubeconfigError  # noqa: PLC0415 - see TYPE_CHECKING above
    from kubernetes.client.exceptions import ApiException  # noqa: PLC0415

    try:
        code: int = args.func(args)
    except KubeconfigError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_CLUSTER
    except (ApiException, urllib3.exceptions.HTTPError) as exc:
        if args.debug:
            raise
        print(f"error: {api_error_text(exc)} (--debug shows where)", file=sys.stderr)
        return 1
    except (ClusterError, RuntimeError) as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
