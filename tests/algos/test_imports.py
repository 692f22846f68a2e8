"""mmgym.algos imports only mmgym.core and itself (direction core -> ... -> algos)."""

from __future__ import annotations

import ast
from pathlib import Path

import mmgym.algos

ALLOWED = ("mmgym.core", "mmgym.algos")


def test_algos_imports_only_core():
    root = Path(mmgym.algos.__file__).parent
    bad = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    bad.append(f"{path.name}: relative import (use mmgym.algos...)")
                names = [node.module or ""]
            for name in names:
                if (name == "mmgym" or name.startswith("mmgym.")) and not name.startswith(ALLOWED):
                    bad.append(f"{path.name}: {name}")
    assert not bad, bad
