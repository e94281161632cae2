"""Build the CityNerve image with buildah, without a registry or a Docker engine (``make images``).

    python images/build.py                 # build (cached), export an OCI archive, print the references
    python images/build.py --smoke         # and run the image's own checks with `buildah run`

1. A Debian bookworm root filesystem (``mmdebstrap --variant=minbase``: Python 3.11 and CA
   certificates, no compiler), cached in ``~/.cache/citynerve/images`` by its package list.
2. The ``citynerve`` distribution and its dependencies, installed for that Python into a folder
   (``uv pip install --target``, from uv's cache after the first build), scripts pointed at
   ``/usr/bin/python3``, the situation map's assets beside the code (the host's Python is 3.11
   on the same glibc, so its wheels are the image's).
3. The pinned ``nats-server`` (the city broker) from the toolchain's cache, built there if missing.
4. ``buildah bud`` of ``images/Containerfile`` over those contexts (``--storage-driver vfs
   --isolation chroot``: what works in an unprivileged sandbox), tagged ``localhost/citynerve:<version>``
   and ``…:<version>-<commit>``, labelled ``org.opencontainers.image.*``, then pushed to
   ``.citynerve/images/citynerve-<version>-<commit>.oci.tar`` (``skopeo copy`` or ``crane push``
   takes it to a registry).

A build is skipped when an image of the same content (sources, dependencies, root filesystem,
Containerfile) already exists: the content key is an image label.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("CITYNERVE_CACHE", Path.home() / ".cache" / "citynerve")) / "images"
WORK = ROOT / ".citynerve" / "images"
SUITE = "bookworm"
# What the root filesystem holds besides Debian's minimal base; no build tools.
PACKAGES = ("python3", "python-is-python3", "ca-certificates", "tzdata")
SOURCE_FOLDERS = ("operators", "workloads", "models", "observability")
BUILDAH = ("buildah", "--storage-driver", "vfs")
CONTENT_LABEL = "io.citynerve.content"


def run(*cmd: str, capture: bool = False, cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, text=True, check=False,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.PIPE if capture else None)
    if proc.returncode != 0:
        detail = (proc.stderr or "").strip()[-2000:] if capture else ""
        raise SystemExit(f"images: `{' '.join(cmd[:4])} …` failed with exit code {proc.returncode}. {detail}")
    return proc.stdout or ""


def package_version() -> str:
    for line in (ROOT / "pyproject.toml").read_text().splitlines():
        if line.startswith("version = "):
            return line.split('"')[1]
    raise SystemExit("images: pyproject.toml has no `version = \"…\"` line")


def commit() -> str:
    head = run("git", "rev-parse", "--short=12", "HEAD", capture=True, cwd=ROOT).strip()
    dirty = run("git", "status", "--porcelain", "--untracked-files=no", capture=True, cwd=ROOT).strip()
    return f"{head}-dirty" if dirty else head


def rootfs() -> Path:
    """The cached Debian root filesystem for ``PACKAGES``."""
    key = hashlib.sha256(f"{SUITE} minbase {' '.join(PACKAGES)}".encode()).hexdigest()[:12]
    path = CACHE / f"rootfs-{SUITE}-{key}.tar"
    if path.is_file():
        print(f"  root filesystem: cached ({path.name})", flush=True)
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.partial.tar")  # mmdebstrap picks its format by the suffix
    print(f"  root filesystem: mmdebstrap {SUITE} ({', '.join(PACKAGES)})", flush=True)
    run("mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(PACKAGES)}",
        "--aptopt=Acquire::Retries \"3\"", SUITE, str(partial))
    partial.rename(path)
    return path


def nats_server() -> Path:
    """The toolchain's pinned nats-server (a static binary), built into its cache if missing."""
    from citynerve.operators.localfed import toolchain  # noqa: PLC0415

    toolchain.build(toolchain.COMPONENTS["nats"])
    return toolchain.binary("nats-server")


def content_key(base: Path, nats: Path) -> str:
    """A digest of what the image is made of: tracked sources, packaging, root filesystem, nats-server."""
    digest = hashlib.sha256(base.name.encode())
    digest.update(nats.parent.name.encode())  # nats-<version>
    listed = run("git", "ls-files", "-s", "--", *SOURCE_FOLDERS, "pyproject.toml", "setup.py",
                 "images/Containerfile", capture=True, cwd=ROOT)
    digest.update(listed.encode())
    digest.update(run("git", "diff", "HEAD", "--", *SOURCE_FOLDERS, "pyproject.toml", "setup.py",
                      capture=True, cwd=ROOT).encode())
    for asset in web_assets():
        digest.update(asset.read_bytes())
    return digest.hexdigest()[:16]


def web_assets() -> list[Path]:
    """The situation map's files that live outside the Python package data (``make web``)."""
    from citynerve.observability.situation.server import ASSETS  # noqa: PLC0415

    missing = [p for p in ASSETS.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"images: the situation map's assets are missing ({missing[0]}); run `make web`")
    return sorted(ASSETS.values())


def site(into: Path) -> None:
    """The distribution and its dependencies for the image's Python 3.11, in ``into``."""
    if into.exists():
        shutil.rmtree(into)
    print("  packages: uv pip install --target", flush=True)
    run(str(ROOT / ".venv" / "bin" / "uv"), "pip", "install", "--quiet",
        "--python", str(ROOT / ".venv" / "bin" / "python"), "--target", str(into), "--compile-bytecode",
        str(ROOT))
    shutil.rmtree(ROOT / "build", ignore_errors=True)  # setuptools' scratch folder of that build
    for script in (into / "bin").iterdir():
        text = script.read_bytes()
        if text.startswith(b"#!") and b"python" in text.split(b"\n", 1)[0]:
            script.write_bytes(b"#!/usr/bin/python3\n" + text.split(b"\n", 1)[1])
    for asset in web_assets():
        target = into / "citynerve" / asset.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(asset, target)


def existing_content(ref: str) -> str | None:
    proc = subprocess.run([*BUILDAH, "inspect", "--type", "image", ref], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        return None
    labels = json.loads(proc.stdout).get("OCIv1", {}).get("config", {}).get("Labels") or {}
    return labels.get(CONTENT_LABEL)


def build() -> tuple[list[str], Path]:
    version, revision = package_version(), commit()
    repository = "localhost/citynerve"
    refs = [f"{repository}:{version}", f"{repository}:{version}-{revision}"]
    base = rootfs()
    nats = nats_server()
    key = content_key(base, nats)
    archive = WORK / f"citynerve-{version}-{revision}.oci.tar"
    if existing_content(refs[1]) == key and archive.is_file():
        print(f"  image: unchanged ({refs[1]})", flush=True)
        run(*BUILDAH, "tag", refs[1], refs[0])
        return refs, archive
    context = WORK / "context"
    context.mkdir(parents=True, exist_ok=True)
    site(context / "site")
    link = context / "rootfs.tar"
    link.unlink(missing_ok=True)
    shutil.copy2(base, link)
    (context / "bin").mkdir(exist_ok=True)
    shutil.copy2(nats, context / "bin" / "nats-server")
    created = run("git", "log", "-1", "--format=%cI", capture=True, cwd=ROOT).strip()
    labels = {
        "org.opencontainers.image.title": "citynerve",
        "org.opencontainers.image.description":
            "CityNerve: operators, agent, ingest, the city broker, Ray workloads and MLflow",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.created": created,
        "org.opencontainers.image.licenses": "Apache-2.0",
        "org.opencontainers.image.base.name": f"debian:{SUITE} (mmdebstrap minbase)",
        CONTENT_LABEL: key,
    }
    print(f"  image: buildah bud {refs[1]}", flush=True)
    run(*BUILDAH, "bud", "--quiet", "--isolation", "chroot",  # one layer: vfs copies each whole
        *[arg for k, v in labels.items() for arg in ("--label", f"{k}={v}")],
        "-t", refs[1], "-t", refs[0], "-f", str(ROOT / "images" / "Containerfile"), str(context),
        capture=True)
    for old in WORK.glob("citynerve-*.oci.tar"):
        old.unlink()
    run(*BUILDAH, "push", "--quiet", refs[1], f"oci-archive:{archive}:{refs[1]}")
    shutil.rmtree(context / "site")
    forget_older_builds(repository, keep=refs)
    return refs, archive


def forget_older_builds(repository: str, keep: list[str]) -> None:
    """Earlier builds' tags and their storage (vfs keeps a full copy of every image)."""
    listed = run(*BUILDAH, "images", "--format", "{{.Name}}:{{.Tag}}", capture=True).split()
    stale = [ref for ref in listed if ref.startswith(f"{repository}:") and ref not in keep]
    if stale:
        run(*BUILDAH, "rmi", *stale, capture=True)
    run(*BUILDAH, "rmi", "--prune", capture=True)


def smoke(ref: str) -> None:
    """The image runs as a non-root user, its CLI and the broker answer, the workloads' engines import."""
    container = run(*BUILDAH, "from", "--quiet", ref, capture=True).strip()
    try:
        drill = json.dumps({"kind": "urban-flood", "mode": "drill", "fleets": [], "models": [],
                            "thresholds": {}, "simulation": {"seed": 0}})
        checks = (
            ("id", "-u"),
            ("citynerve", "--version"),
            ("python", "-c", "import ray, wntr, pyswmm, mlflow, kopf, citynerve.workloads.runner, "
                             "citynerve.workloads.dataplane.worker, citynerve.workloads.dataplane.broker, "
                             "citynerve.operators.hub.main, citynerve.operators.city.main; "
                             "print(ray.__version__)"),
            ("mlflow", "--version"),
            # the workload runner scores a SWMM drill on Ray, as a RayJob's entrypoint would
            ("sh", "-ec", f"printf '%s' '{drill}' > /tmp/spec.json; "
                          "python -m citynerve.workloads.runner --spec /tmp/spec.json 2>&1 | tail -1"),
            ("nats-server", "--version"),
        )
        outputs = [run(*BUILDAH, "run", "--isolation", "chroot", container, "--", *c, capture=True).strip()
                   for c in checks]
    finally:
        run(*BUILDAH, "rm", container, capture=True)
    if outputs[0] != "65532":
        raise SystemExit(f"images: {ref} runs as uid {outputs[0]}, not 65532")
    from citynerve.operators.localfed.toolchain import NATS_VERSION  # noqa: PLC0415

    if outputs[5] != f"nats-server: {NATS_VERSION}":
        raise SystemExit(f"images: the broker in {ref} answers {outputs[5]!r}")
    summary = json.loads(outputs[4].splitlines()[-1])["summary"]
    if summary.get("kind") != "urban-flood" or not summary.get("incidents"):
        raise SystemExit(f"images: the runner in {ref} scored no incident: {outputs[4][-500:]}")
    print(f"  smoke: uid {outputs[0]}; {outputs[1]}; Ray {outputs[2].splitlines()[-1]}, WNTR, SWMM, "
          f"MLflow ({outputs[3].splitlines()[-1]}) import; the runner scored a SWMM drill on Ray "
          f"({summary['incidents']} incidents); {outputs[5]}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="run the image's checks after building")
    args = parser.parse_args(argv)
    for tool in ("buildah", "mmdebstrap"):
        if shutil.which(tool) is None:
            raise SystemExit(f"images: {tool} is missing; `make system-packages` installs it")
    print("==> Image (buildah, vfs storage)", flush=True)
    refs, archive = build()
    if args.smoke:
        smoke(refs[1])
    digest = run(*BUILDAH, "inspect", "--type", "image", "--format", "{{.FromImageDigest}}", refs[1],
                 capture=True).strip()
    for ref in refs:
        print(ref)
    print(f"digest {digest}; OCI archive {archive.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
