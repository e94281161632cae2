"""The image the charts name is built from this repository (`make images`), runs as non-root, and
carries what each chart's processes run; the charts name nothing else."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from citynerve.operators import helm, images

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
BUILDAH = ("buildah", "--storage-driver", "vfs")


def _rendered_images() -> set[str]:
    found: set[str] = set()
    for chart in (helm.HUB_CHART, helm.CITY_CHART):
        for values in [None, *sorted((chart / "ci").glob("*.yaml"))]:
            docs = helm.template(chart, helm.read_values_file(values), release="images",
                                 namespace="citynerve")
            for doc in docs:
                pod = (doc.get("spec") or {}).get("template", {}).get("spec") or {}
                for container in [*pod.get("containers", []), *pod.get("initContainers", [])]:
                    found.add(container["image"])
    return found


@pytest.mark.timeout(2400)
def test_make_images_builds_what_the_charts_name_and_it_runs() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "images" / "build.py"), "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=2300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    printed = [line for line in proc.stdout.splitlines() if line.startswith(images.REPOSITORY + ":")]
    assert images.reference() in printed, proc.stdout
    assert "smoke: uid 65532" in proc.stdout
    assert "the runner scored a SWMM drill on Ray" in proc.stdout
    # every image a chart renders is one this build tagged
    assert _rendered_images() <= set(printed), f"{_rendered_images()} not all in {printed}"
    inspected = json.loads(subprocess.run([*BUILDAH, "inspect", "--type", "image", images.reference()],
                                          capture_output=True, text=True, check=True, timeout=60).stdout)
    config = inspected["OCIv1"]["config"]
    assert config["User"] == "65532:65532"
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == images.package_version()
    revision = labels["org.opencontainers.image.revision"]
    assert f"{images.reference()}-{revision}" in printed  # the pinning tag names the commit it was built from
    commit = revision.removesuffix("-dirty")
    subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT, check=True, timeout=30)
    archive = next(line for line in proc.stdout.splitlines() if "OCI archive" in line).rsplit(" ", 1)[1]
    assert (ROOT / archive).stat().st_size > 100 * 2**20
