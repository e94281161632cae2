"""The `citynerve` command: one entry point for platform teams, city IT and ML engineers."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from citynerve.operators.localfed import toolchain
from citynerve.operators.localfed.cluster import ClusterError
from citynerve.operators.localfed.federation import DEFAULT_CITIES, LocalFederation


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell, like ``kubectl get``."""
    cells = [list(map(str, header)), *[list(map(str, r)) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def cluster_table(federation: LocalFederation) -> str:
    rows = [(s["name"], s["api"], s["version"], s["nodes_ready"]) for s in federation.status()]
    return format_table(("CLUSTER", "API", "VERSION", "NODES READY"), rows)


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

    return demo.run(state_dir=args.state_dir, keep=args.keep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="citynerve", description=__doc__)
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
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (ClusterError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
