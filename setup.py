"""Lists the `citynerve.*` subpackages; all other metadata is in pyproject.toml.

setuptools cannot find packages under a renamed prefix by itself, so the folders that
pyproject.toml maps (`operators/` → `citynerve.operators`, …) are walked here.
"""

from setuptools import find_packages, setup

SOURCE_FOLDERS = ("operators", "workloads", "models", "observability")

packages = [
    f"citynerve.{pkg}"
    for pkg in find_packages(include=[f"{folder}*" for folder in SOURCE_FOLDERS])
]
setup(
    packages=packages,
    package_data={
        f"citynerve.{folder}": ["**/*.json", "**/*.yaml", "**/*.html", "**/*.js", "**/*.css"]
        for folder in SOURCE_FOLDERS
    },
)
