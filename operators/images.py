"""The container image every CityNerve process runs from, named once.

One image holds the one distribution: the hub and city operators, the federation agent, the
fleets' ingest workers, the Ray workloads (Ray, WNTR, SWMM) and the hub's MLflow server. The
city operator's default workload mode runs Ray inside its own pod, so an operator image without
Ray would not run a scenario; one image is also one thing to scan, sign and mirror.

``images/build.py`` (``make images``) builds it and tags it ``REPOSITORY:<version>`` and
``REPOSITORY:<version>-<commit>``; the charts' default references are ``REPOSITORY:<appVersion>``
and the operators name the same image for the children they create.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

REPOSITORY = "localhost/citynerve"  # push it to a registry and set the charts' image.repository


def package_version() -> str:
    try:
        return version("citynerve")
    except PackageNotFoundError:  # pragma: no cover - the package is always installed
        return "0.0.0"


def reference(tag: str | None = None) -> str:
    """``REPOSITORY:<tag>``; the tag defaults to the installed package's version."""
    return f"{REPOSITORY}:{tag or package_version()}"
