"""The layout promised in DESIGN.md holds: folders map to `citynerve.*`, nothing imports e2e."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("operators", "workloads", "models", "observability")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("folder", SOURCE_FOLDERS)
def test_folder_is_a_citynerve_subpackage(folder: str) -> None:
    module = importlib.import_module(f"citynerve.{folder}")
    assert Path(module.__file__ or "").resolve().parent == ROOT / folder


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.timeout(30)
def test_nothing_imports_e2e() -> None:
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for folder in (*SOURCE_FOLDERS, "tests", "bench")
        for path in (ROOT / folder).rglob("*.py")
        for name in _imported_modules(path)
        if name == "e2e" or name.startswith("e2e.") or name == "conftest"
    ]
    assert not offenders, "e2e is a leaf: " + "; ".join(offenders)
