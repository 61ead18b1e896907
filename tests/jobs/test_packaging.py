"""Packaging stays honest: every declared runtime dependency is imported by the package."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: Import name of a distribution when it differs from the distribution's name.
IMPORT_NAMES = {"typing-extensions": "typing_extensions"}


def _runtime_dependencies() -> list[str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, flags=re.DOTALL | re.MULTILINE)
    assert block is not None, "no [project].dependencies list in pyproject.toml"
    return [re.split(r"[\[<>=!~; ]", spec, maxsplit=1)[0] for spec in re.findall(r'"([^"]+)"', block.group(1))]


def _imported_top_level_modules() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "mindtrace").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_every_runtime_dependency_is_imported_by_the_package() -> None:
    dependencies = _runtime_dependencies()
    assert "pydantic" in dependencies
    imported = _imported_top_level_modules()
    unused = [name for name in dependencies if IMPORT_NAMES.get(name, name.replace("-", "_")) not in imported]
    assert unused == [], f"declared runtime dependencies nothing in mindtrace/ imports: {unused}"
