"""Build the pinned Kubernetes, etcd, kwok, helm, KubeRay and NATS binaries from Go modules.

Every binary is built once into a per-user cache keyed by its version
(``~/.cache/citynerve/bin/<component>-<version>/``) and reused afterwards. Only the
Go module proxy is needed: a dependency's own ``replace`` directives are ignored when it
is required from another module, so ``k8s.io/kubernetes`` is built from a small module of
our own that replaces each staging module with its published version.

This module uses the standard library only, so it can run before the virtualenv exists.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

KUBERNETES_VERSION = "v1.34.4"
ETCD_VERSION = "v3.6.6"
KWOK_VERSION = "v0.7.0"
HELM_VERSION = "v3.19.0"
KUBERAY_VERSION = "v1.4.0"
NATS_VERSION = "v2.15.2"

# k8s.io/kubernetes pins its staging modules to v0.0.0 and replaces them with ./staging;
# the published copies carry the same code at v0.<minor>.<patch>.
_STAGING_MODULES = (
    "api", "apiextensions-apiserver", "apimachinery", "apiserver", "cli-runtime",
    "client-go", "cloud-provider", "cluster-bootstrap", "code-generator", "component-base",
    "component-helpers", "controller-manager", "cri-api", "cri-client", "csi-translation-lib",
    "dynamic-resource-allocation", "endpointslice", "externaljwt", "kms", "kube-aggregator",
    "kube-controller-manager", "kube-proxy", "kube-scheduler", "kubectl", "kubelet", "metrics",
    "mount-utils", "pod-security-admission", "sample-apiserver", "sample-cli-plugin",
    "sample-controller",
)
_KUBE_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")


def cache_root() -> Path:
    """The per-user cache; ``CITYNERVE_CACHE`` overrides it."""
    env = os.environ.get("CITYNERVE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "citynerve"


@dataclass(frozen=True)
class Component:
    """One pinned tool: the binaries it provides and how to build them."""

    name: str
    version: str
    binaries: tuple[str, ...]
    go_install: str = ""  # a ``pkg@version`` for ``go install``; empty means a module of ours
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def bin_dir(self) -> Path:
        return cache_root() / "bin" / f"{self.name}-{self.version}"

    def is_built(self) -> bool:
        return all((self.bin_dir / b).is_file() for b in self.binaries)


COMPONENTS: dict[str, Component] = {
    "kubernetes": Component("kubernetes", KUBERNETES_VERSION, _KUBE_COMMANDS),
    "etcd": Component("etcd", ETCD_VERSION, ("etcd",)),
    "kwok": Component("kwok", KWOK_VERSION, ("kwok",),
                      go_install=f"sigs.k8s.io/kwok/cmd/kwok@{KWOK_VERSION}"),
    "helm": Component("helm", HELM_VERSION, ("helm",),
                      go_install=f"helm.sh/helm/v3/cmd/helm@{HELM_VERSION}"),
    "kuberay": Component("kuberay", KUBERAY_VERSION, ("ray-operator",),
                         go_install=f"github.com/ray-project/kuberay/ray-operator@{KUBERAY_VERSION}"),
    "nats": Component("nats", NATS_VERSION, ("nats-server",),
                      go_install=f"github.com/nats-io/nats-server/v2@{NATS_VERSION}"),
}
DEFAULT_COMPONENTS = ("etcd", "kubernetes", "kwok", "helm", "nats")


def binary(name: str) -> Path:
    """Path of a cached binary by its file name (``kube-apiserver``, ``helm``, …)."""
    for comp in COMPONENTS.values():
        if name in comp.binaries:
            return comp.bin_dir / name
    msg = f"no pinned component provides the binary {name!r}"
    raise KeyError(msg)


def _kube_go_mod() -> str:
    minor_patch = KUBERNETES_VERSION.removeprefix("v1.")
    lines = ["module citynerve.local/kubebuild", "", "go 1.24", "",
             f"require k8s.io/kubernetes {KUBERNETES_VERSION}", ""]
    lines += [f"replace k8s.io/{m} => k8s.io/{m} v0.{minor_patch}" for m in _STAGING_MODULES]
    return "\n".join(lines) + "\n"


def _kube_tools_go() -> str:
    imports = "\n".join(f'\t_ "k8s.io/kubernetes/cmd/{c}"' for c in _KUBE_COMMANDS)
    return f"//go:build tools\n\npackage tools\n\nimport (\n{imports}\n)\n"


def _kube_ldflags() -> str:
    major, minor, _ = KUBERNETES_VERSION.removeprefix("v").split(".")
    pkg = "k8s.io/component-base/version"
    return " ".join([
        f"-X {pkg}.gitVersion={KUBERNETES_VERSION}",
        f"-X {pkg}.gitMajor={major}",
        f"-X {pkg}.gitMinor={minor}",
        f"-X {pkg}.gitTreeState=clean",
        "-s -w",
    ])


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GOTOOLCHAIN", "local")
    env.setdefault("CGO_ENABLED", "0")
    env["GOFLAGS"] = (env.get("GOFLAGS", "") + " -mod=mod").strip()
    return env


def _run_go(args: list[str], cwd: Path, env: dict[str, str]) -> None:
    """Run a go command; retry without the checksum database if it cannot be reached."""
    proc = subprocess.run(["go", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0 and ("sum.golang" in proc.stderr or "verifying" in proc.stderr):
        print("  checksum database unreachable; retrying with GONOSUMDB", file=sys.stderr)
        env = {**env, "GONOSUMDB": "*", "GONOSUMCHECK": "1", "GOSUMDB": "off"}
        proc = subprocess.run(["go", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        msg = f"`go {' '.join(args)}` failed in {cwd} (exit {proc.returncode}); see the output above"
        raise RuntimeError(msg)


def build(comp: Component) -> float:
    """Build one component into its cache folder; returns seconds spent (0 if cached).

    Concurrent callers (a test run and a demo, say) take a lock per component, so one
    builds and the others wait for its result.
    """
    if comp.is_built():
        return 0.0
    lock_path = cache_root() / "build" / f"{comp.name}-{comp.version}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if comp.is_built():
            return 0.0
        return _build_locked(comp)


def _build_locked(comp: Component) -> float:
    start = time.monotonic()
    env = _go_env()
    work = cache_root() / "build" / f"{comp.name}-{comp.version}"
    out = comp.bin_dir.with_name(comp.bin_dir.name + ".partial")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    work.mkdir(parents=True, exist_ok=True)
    if comp.go_install:
        _run_go(["install", comp.go_install], cwd=work, env={**env, "GOBIN": str(out)})
    elif comp.name == "kubernetes":
        (work / "go.mod").write_text(_kube_go_mod())
        (work / "tools.go").write_text(_kube_tools_go())
        _run_go(["mod", "tidy"], cwd=work, env=env)
        pkgs = [f"k8s.io/kubernetes/cmd/{c}" for c in _KUBE_COMMANDS]
        _run_go(["build", "-ldflags", _kube_ldflags(), "-o", str(out) + "/", *pkgs], cwd=work, env=env)
    elif comp.name == "etcd":
        (work / "go.mod").write_text("module citynerve.local/etcdbuild\n\ngo 1.24\n")
        _run_go(["get", f"go.etcd.io/etcd/server/v3@{comp.version}"], cwd=work, env=env)
        _run_go(["build", "-ldflags", "-s -w", "-o", str(out / "etcd"), "go.etcd.io/etcd/server/v3"],
                cwd=work, env=env)
    else:  # pragma: no cover - the table above is exhaustive
        msg = f"no build recipe for {comp.name}"
        raise RuntimeError(msg)
    seconds = time.monotonic() - start
    # Kept beside the binaries so bench/federation.py can report the cold build time.
    (out / "build.json").write_text(json.dumps({"component": comp.name, "version": comp.version,
                                                "seconds": round(seconds, 1)}))
    shutil.rmtree(comp.bin_dir, ignore_errors=True)
    out.rename(comp.bin_dir)
    return seconds


def recorded_build_seconds() -> dict[str, float]:
    """Seconds each cached component took to build when it was built (cold)."""
    found = {}
    for comp in COMPONENTS.values():
        try:
            found[comp.name] = float(json.loads((comp.bin_dir / "build.json").read_text())["seconds"])
        except (OSError, ValueError, KeyError):
            continue
    return found


def ensure(names: tuple[str, ...] = DEFAULT_COMPONENTS) -> dict[str, float]:
    """Build whatever of ``names`` is missing; returns seconds per component."""
    if shutil.which("go") is None:
        msg = "the go command is not on PATH; install Go 1.24 or newer"
        raise RuntimeError(msg)
    spent = {}
    for name in names:
        comp = COMPONENTS[name]
        state = "cached" if comp.is_built() else "building"
        print(f"  {comp.name} {comp.version}: {state}", flush=True)
        spent[name] = build(comp)
        if spent[name]:
            print(f"  {comp.name} {comp.version}: built in {spent[name]:.0f} s", flush=True)
    return spent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("components", nargs="*", default=list(DEFAULT_COMPONENTS),
                        choices=sorted(COMPONENTS),
                        help="what to build (default: the control plane, helm and the broker)")
    args = parser.parse_args(argv)
    try:
        ensure(tuple(args.components))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
