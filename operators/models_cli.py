"""``citynerve models train|evaluate|promote``: the ML engineer's commands.

``train`` and ``evaluate`` talk to MLflow (``--tracking-uri``, default ``$MLFLOW_TRACKING_URI``) as
the identity in MLflow's own ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (the
trainer's, docs/models-trust.md);
``promote`` creates a ``ModelPromotion`` on the hub, recording who asked for it (the caller's
Kubernetes identity, from a SelfSubjectReview), and can wait for its outcome. The hub does the
rest: gates, canary, soak, rollback and the alias move (``operators/hub/promotion.py``).

    citynerve models promote water-burst-detector --version 3 --alias champion \\
        --cities region=east --canary shanghai --gate 'detectionRate>=0.7' --soak 600
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from citynerve.operators.api.hub import ModelPromotionSpec
from citynerve.operators.hub.promotion import REQUESTED_BY_ANNOTATION, SOAK_INCIDENTS, selection_refusal

if TYPE_CHECKING:
    from citynerve.models.registry import ModelVersionRecord

GROUP, VERSION = "citynerve.io", "v1alpha1"
DEFAULT_NAMESPACE = "citynerve-system"
_GATE = re.compile(r"^\s*([a-z][A-Za-z0-9]*)\s*(>=|<=|>|<)\s*(-?[0-9]+(?:\.[0-9]+)?)\s*$")
_OPERATORS = {">=": "GreaterThanOrEqual", ">": "GreaterThan", "<=": "LessThanOrEqual", "<": "LessThan"}
_SET_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9./_-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def parse_gate(text: str) -> dict[str, str]:
    """``detectionRate>=0.7`` → a gate; ValueError naming the expected form otherwise."""
    match = _GATE.match(text)
    if not match:
        raise ValueError(f"gate {text!r} is not <camelCaseMetric><op><number> with op one of >=, >, <=, <")
    metric, op, threshold = match.groups()
    return {"metric": metric, "operator": _OPERATORS[op], "threshold": threshold}


def _split_requirements(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [p for p in (*parts, current) if p.strip()]


def parse_selector(text: str) -> dict[str, Any]:
    """A kubectl-style selector (``region=east``, ``tier in (a,b)``, ``!legacy``); ``""`` selects all."""
    labels: dict[str, str] = {}
    expressions: list[dict[str, Any]] = []
    for part in _split_requirements(text):
        if match := _SET_REQUIREMENT.match(part):
            key, op, values = match.groups()
            expressions.append(
                {
                    "key": key,
                    "operator": "In" if op == "in" else "NotIn",
                    "values": [v.strip() for v in values.split(",") if v.strip()],
                }
            )
        elif "!=" in part:
            key, value = (s.strip() for s in part.split("!=", 1))
            expressions.append({"key": key, "operator": "NotIn", "values": [value]})
        elif "=" in part:
            key, value = (s.strip() for s in part.replace("==", "=").split("=", 1))
            labels[key] = value
        elif part.strip().startswith("!"):
            expressions.append({"key": part.strip()[1:], "operator": "DoesNotExist"})
        else:
            expressions.append({"key": part.strip(), "operator": "Exists"})
    selector: dict[str, Any] = {}
    if labels:
        selector["matchLabels"] = labels
    if expressions:
        selector["matchExpressions"] = expressions
    return selector


def promotion_manifest(
    model: str,
    *,
    version: str | None,
    from_alias: str | None,
    alias: str,
    cities: str,
    canary: str | None,
    gates: Sequence[str],
    soak_seconds: int,
    max_failed_cities: int,
    timeout_seconds: int,
    name: str | None,
    namespace: str,
    actor: str,
) -> dict[str, Any]:
    """The ModelPromotion ``promote`` creates; validated against the API's own model."""
    spec: dict[str, Any] = {
        "modelName": model,
        "source": {"version": version} if version else {"alias": from_alias},
        "targetAlias": alias,
        "citySelector": parse_selector(cities),
        "gates": [parse_gate(g) for g in gates],
        "soakSeconds": soak_seconds,
        "rollback": {"maxFailedCities": max_failed_cities, "timeoutSeconds": timeout_seconds},
    }
    if canary:
        spec["canaryCity"] = canary
    ModelPromotionSpec.model_validate(spec)  # the same rules the API server's schema enforces
    base = re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-")[:40]
    suffix = f"v{version}" if version else from_alias or "alias"
    metadata: dict[str, Any] = {"namespace": namespace, "annotations": {REQUESTED_BY_ANNOTATION: actor}}
    if name:
        metadata["name"] = name
    else:
        metadata["generateName"] = f"{base}-{suffix.lower()}-to-{alias.lower()}-"[:58]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelPromotion", "metadata": metadata, "spec": spec}


def caller_identity(api_client: Any) -> str:
    """Who the hub sees calling (SelfSubjectReview), or the local user if the server cannot say."""
    from kubernetes import client  # noqa: PLC0415

    try:
        review = client.AuthenticationV1Api(api_client).create_self_subject_review({})
        username: str = review.status.user_info.username
    except (client.ApiException, AttributeError):
        return f"local:{getpass.getuser()}"
    return username


def promotion_refusal(
    manifest: Mapping[str, Any],
    cities: Sequence[Mapping[str, Any]] | None,
    record: ModelVersionRecord | None,
) -> str | None:
    """Why the hub would refuse this promotion for its input alone, as a sentence, or None (pure).

    ``cities`` are the hub's City objects and ``record`` is what MLflow holds of the source version
    (either None: not read). What only the hub decides (gate thresholds met, the artifact's digest) is
    left to it, and recorded on the ModelPromotion.
    """
    spec = ModelPromotionSpec.model_validate(manifest["spec"])
    refusal = selection_refusal(spec, cities) if cities is not None else None
    if refusal is not None:
        return f"The promotion of {spec.model_name} is refused: {refusal[1]}."
    if record is None:
        return None
    missing = sorted({g.metric for g in spec.gates if g.metric != SOAK_INCIDENTS} - set(record.metrics))
    if missing:
        recorded = ", ".join(sorted(record.metrics)) or "none"
        return (
            f"The promotion of {spec.model_name} version {record.version} is refused: its gates name "
            f"{', '.join(missing)}, which the version's run does not record (it records: {recorded}); "
            f"correct the --gate metric names."
        )
    return None


def check_promotion(api_client: Any, manifest: Mapping[str, Any], tracking_uri: str | None) -> None:
    """Raise a ValueError naming what is wrong, before anything is created, when the hub would refuse
    the promotion for its input: no such model, version or alias in MLflow (read at ``tracking_uri``;
    not read when None), a gate on a metric the version does not record, a selector that picks no
    joined City, or a canary it does not pick."""
    from citynerve.models.registry import ModelResolutionError, read_model_version  # noqa: PLC0415
    from kubernetes import client  # noqa: PLC0415

    spec = ModelPromotionSpec.model_validate(manifest["spec"])
    record = None
    if tracking_uri:
        try:
            record = read_model_version(
                tracking_uri, spec.model_name, version=spec.source.version, alias=spec.source.alias
            )
        except ModelResolutionError as exc:
            raise ValueError(f"The promotion of {spec.model_name} is refused: {exc.message}.") from exc
    cities: list[dict[str, Any]] | None = None
    try:
        listed = client.CustomObjectsApi(api_client).list_cluster_custom_object(GROUP, VERSION, "cities")
        cities = list(listed.get("items") or [])
    except client.ApiException as exc:
        if exc.status != 403:
            raise
        sys.stderr.write("note: this identity may not list Cities on the hub, so the hub checks the city "
                         "selection and the canary itself.\n")
    refusal = promotion_refusal(manifest, cities, record)
    if refusal is not None:
        raise ValueError(refusal)


def create_promotion(
    api_client: Any, manifest: dict[str, Any], tracking_uri: str | None = None
) -> dict[str, Any]:
    """Check the promotion (``check_promotion``; MLflow at ``tracking_uri``, else $MLFLOW_TRACKING_URI,
    else not read), then create it: a promotion refused for its input leaves nothing behind."""
    from kubernetes import client  # noqa: PLC0415

    check_promotion(api_client, manifest, tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    namespace = manifest["metadata"]["namespace"]
    core = client.CoreV1Api(api_client)
    try:
        core.create_namespace({"metadata": {"name": namespace}})
    except client.ApiException as exc:
        if exc.status not in (403, 409):  # exists, or we may not create namespaces: try anyway
            raise
    created: dict[str, Any] = client.CustomObjectsApi(api_client).create_namespaced_custom_object(
        GROUP, VERSION, namespace, "modelpromotions", manifest
    )
    return created


def wait_for_outcome(api_client: Any, namespace: str, name: str, timeout: float) -> dict[str, Any]:
    """Poll until the promotion's Complete condition is True or False; its status."""
    from kubernetes import client  # noqa: PLC0415

    custom = client.CustomObjectsApi(api_client)
    deadline = time.monotonic() + timeout
    while True:
        obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "modelpromotions", name)
        status: dict[str, Any] = obj.get("status") or {}
        complete = next((c for c in status.get("conditions") or [] if c.get("type") == "Complete"), None)
        if complete and complete.get("status") in ("True", "False"):
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"ModelPromotion {namespace}/{name} had no outcome within {timeout:.0f} s")
        time.sleep(0.5)


# --- the commands -----------------------------------------------------------------------------------


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")


_REFUSED_IDENTITY = {
    "UNAUTHENTICATED": "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (the trainer's identity)",
    "PERMISSION_DENIED": "this identity may not do that; training runs as the trainer identity",
}


def _guarded(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Bad input (a malformed gate, no MLflow server) and timeouts become a message and exit status 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (ValueError, TimeoutError) as exc:
            sys.stderr.write(f"error: {exc}\n")
            return 1
        except Exception as exc:
            if getattr(exc, "error_code", None) in _REFUSED_IDENTITY:  # MLflow refused the identity
                sys.stderr.write(f"error: the MLflow server refused this identity: {exc}; "
                                 f"{_REFUSED_IDENTITY[getattr(exc, 'error_code', '')]}\n")
                return 1
            raise

    return run


def _tracking_uri(args: argparse.Namespace) -> str:
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError("no MLflow server: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    return str(uri)


_HISTORY_OPTIONS = ("pressure_fleet", "supply_fleet", "supply_history", "since", "until")


def _utc(moment: datetime | None) -> datetime | None:
    """A time from the command line: UTC when it names no zone."""
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


def _config(args: argparse.Namespace) -> Any:
    from citynerve.models.training import WaterTrainingConfig  # noqa: PLC0415 - loads the simulators

    params = {}
    for item in args.param or []:
        key, _, value = item.partition("=")
        params[key] = float(value)
    history = None
    if getattr(args, "from_history", None) is not None:
        from citynerve.workloads.water import WaterHistory  # noqa: PLC0415

        if not (args.pressure_fleet and args.supply_fleet):
            raise ValueError("--from-history needs --pressure-fleet and --supply-fleet")
        if not args.from_history.is_dir():
            raise ValueError(f"--from-history {args.from_history}: no such folder")
        history = WaterHistory(args.from_history, args.pressure_fleet, args.supply_fleet,
                               _utc(args.since), _utc(args.until), args.supply_history)
    elif any(getattr(args, a, None) for a in _HISTORY_OPTIONS):
        raise ValueError("--pressure-fleet, --supply-fleet, --supply-history, --since and --until only go "
                         "with --from-history")
    return WaterTrainingConfig(
        network=args.network,
        history=history,
        history_days=args.history_days,
        evaluation_leaks=args.leaks,
        evaluation_clean_days=args.clean_days,
        evaluation_seed=args.evaluation_seed,
        params=params,
    )


def _train(args: argparse.Namespace) -> int:
    from citynerve.models.training import train_water_detector  # noqa: PLC0415

    result = train_water_detector(_tracking_uri(args), args.name, _config(args), alias=args.alias or None)
    metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.metrics.items()))
    _say(
        f"registered {result.model.name} version {result.model.version} ({result.model.artifact_digest})"
        f"{' as ' + args.alias if args.alias else ''} in {result.seconds:.1f} s; run {result.run_id}"
    )
    _say(f"metrics: {metrics}")
    _say(f"evaluation data set: {result.dataset_digest}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from citynerve.models.training import evaluate_registered  # noqa: PLC0415

    run_id, evaluation = evaluate_registered(_tracking_uri(args), args.name, args.version, _config(args))
    metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(evaluation.metrics.items()))
    _say(f"evaluated {args.name} version {args.version} on {evaluation.dataset_digest}; run {run_id}")
    _say(f"metrics: {metrics}")
    return 0


def _promote(args: argparse.Namespace) -> int:
    from citynerve.operators.runtime import KubeTarget  # noqa: PLC0415
    from kubernetes import client  # noqa: PLC0415

    manifest = promotion_manifest(
        args.name,
        version=args.version,
        from_alias=args.from_alias,
        alias=args.alias,
        cities=args.cities,
        canary=args.canary,
        gates=args.gate or [],
        soak_seconds=args.soak,
        max_failed_cities=args.max_failed_cities,
        timeout_seconds=args.timeout,
        name=args.promotion_name,
        namespace=args.namespace,
        actor="",
    )  # validated before anything is sent
    tracking_uri = _tracking_uri(args)  # the version and its metrics are checked before anything is created
    api_client = client.ApiClient(KubeTarget(args.kubeconfig, args.context).client_configuration())
    manifest["metadata"]["annotations"][REQUESTED_BY_ANNOTATION] = caller_identity(api_client)
    created = create_promotion(api_client, manifest, tracking_uri)
    name = created["metadata"]["name"]
    _say(
        f"modelpromotion {args.namespace}/{name} created; follow it with "
        f"`kubectl get modelpromotion -n {args.namespace} {name}`"
    )
    if not args.wait:
        return 0
    status = wait_for_outcome(api_client, args.namespace, name, args.wait_timeout)
    complete = next(c for c in status["conditions"] if c["type"] == "Complete")
    for outcome in status.get("cities") or []:
        _say(f"  {outcome['city']}: {outcome['reason']}")
    _say(f"{complete['reason']}: {complete['message']}")
    return 0 if complete["status"] == "True" else 3


def add_models_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    models = sub.add_parser("models", help="train, evaluate and promote models (MLflow + ModelPromotion)")
    models_sub = models.add_subparsers(dest="models_command", required=True)

    for command, text in (
        ("train", "train a water-burst detector, evaluate it, register it in MLflow"),
        ("evaluate", "re-evaluate a registered version (artifact digest verified first)"),
    ):
        cmd = models_sub.add_parser(command, help=text)
        cmd.add_argument(
            "--name", default="water-burst-detector", help="registered model (default: %(default)s)"
        )
        if command == "evaluate":
            cmd.add_argument("--version", required=True, help="registered version to evaluate")
        else:
            cmd.add_argument(
                "--alias",
                default="challenger",
                help="alias to point at the new version; '' for none (default: %(default)s)",
            )
        cmd.add_argument("--tracking-uri", default=None, help="MLflow server (default: $MLFLOW_TRACKING_URI)")
        cmd.add_argument("--network", default="Net3", help="WNTR network (default: %(default)s)")
        cmd.add_argument("--history-days", type=int, default=3,
                         help="simulated leak-free days to fit on (without --from-history)")
        if command == "train":
            cmd.add_argument("--from-history", type=Path, default=None, metavar="DIR",
                             help="fit on the zone's stored window history under DIR (the fleets' history "
                                  "volumes, docs/history.md) instead of simulated days")
            cmd.add_argument("--pressure-fleet", help="with --from-history: the pressure loggers' fleet")
            cmd.add_argument("--supply-fleet", help="with --from-history: the zone supply meter's fleet")
            cmd.add_argument("--supply-history", type=Path, default=None, metavar="DIR",
                             help="with --from-history: the supply fleet's history, when not under DIR")
            cmd.add_argument("--since", type=datetime.fromisoformat, default=None,
                             help="with --from-history: first window start (ISO 8601, UTC if no zone)")
            cmd.add_argument("--until", type=datetime.fromisoformat, default=None,
                             help="with --from-history: end of the period, exclusive")
        cmd.add_argument("--leaks", type=int, default=4, help="simulated leaks to evaluate on")
        cmd.add_argument("--clean-days", type=int, default=1, help="leak-free days to count false alarms on")
        cmd.add_argument("--evaluation-seed", type=int, default=100, help="seed of the evaluation runs")
        cmd.add_argument(
            "--param",
            action="append",
            metavar="KEY=VALUE",
            help="detector parameter (for example threshold=12)",
        )
        cmd.set_defaults(func=_guarded(_train if command == "train" else _evaluate))

    promote = models_sub.add_parser("promote", help="create a ModelPromotion on the hub")
    promote.add_argument("name", help="registered model name")
    source = promote.add_mutually_exclusive_group(required=True)
    source.add_argument("--version", help="version to promote")
    source.add_argument("--from-alias", help="promote the version this alias names (for example challenger)")
    promote.add_argument("--alias", default="champion", help="target alias (default: %(default)s)")
    promote.add_argument("--cities", default="", help="label selector over City objects, e.g. region=east")
    promote.add_argument("--canary", default=None, help="city promoted and soaked first")
    promote.add_argument(
        "--gate",
        action="append",
        metavar="METRIC>=VALUE",
        help="a metric the version must meet (repeatable); soakIncidents<=N limits the soak",
    )
    promote.add_argument(
        "--soak", type=int, default=600, help="seconds each city soaks (default: %(default)s)"
    )
    promote.add_argument(
        "--max-failed-cities", type=int, default=0, help="failures tolerated after the canary"
    )
    promote.add_argument("--timeout", type=int, default=3600, help="seconds before rolling back everything")
    promote.add_argument(
        "--promotion-name", default=None, help="name of the ModelPromotion (default: generated)"
    )
    promote.add_argument(
        "--namespace", default=DEFAULT_NAMESPACE, help="hub namespace (default: %(default)s)"
    )
    promote.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow server the version and its gate metrics are checked in before anything is created "
        "(default: $MLFLOW_TRACKING_URI)",
    )
    promote.add_argument(
        "--kubeconfig", type=Path, default=None,
        help="kubeconfig of the hub (default: $KUBECONFIG, else ~/.kube/config, else the in-cluster account)",
    )
    promote.add_argument(
        "--context", default=None, help="context of the hub (default: the kubeconfig's current context)"
    )
    promote.add_argument("--wait", action="store_true", help="wait for the outcome (exit 3 if not promoted)")
    promote.add_argument("--wait-timeout", type=float, default=3600.0, help="seconds --wait waits")
    promote.set_defaults(func=_guarded(_promote))
