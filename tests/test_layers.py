"""The package's layers: lower parts never import higher ones (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fedtune"
# A part may not import these (privacy math and records know nothing of the server, Flower's
# transport, or how clients are simulated).
FORBIDDEN = {"privacy": ("fedtune.server", "fedtune.client", "fedtune.simulation", "fedtune.deploy")}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    found |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    return found


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_lower_parts_do_not_import_higher_ones(part):
    offending = {str(path.relative_to(PACKAGE)): sorted(name for name in imports(path)
                                                         if name.startswith(FORBIDDEN[part]))
                 for path in (PACKAGE / part).rglob("*.py")}
    assert not {path: names for path, names in offending.items() if names}
