"""The import direction of DESIGN §1: core -> tools, rewards -> envs -> agents -> algos -> trainer -> cli."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mmgym"
RANK = {"core": 0, "tools": 1, "rewards": 1, "envs": 2, "agents": 3, "algos": 4, "trainer": 5, "cli": 6}


def _part(module: str) -> str | None:
    bits = module.split(".")
    if bits[0] != "mmgym" or len(bits) < 2:
        return None
    return bits[1]


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names if node.module == "mmgym"]
    return out


def _files():
    return sorted(p for p in PKG.rglob("*.py"))


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(PKG)))
def test_import_direction(path: Path) -> None:
    rel = path.relative_to(PKG)
    me = rel.parts[0].removesuffix(".py") if rel.parts[0] != "__init__.py" else None
    if me is None or me not in RANK:
        return
    for line, mod in _imports(path):
        other = _part(mod)
        if other is None or other not in RANK or other == me:
            continue
        assert RANK[other] < RANK[me], (
            f"{rel}:{line} imports mmgym.{other}, but {me} may import only parts before it in "
            "core -> tools, rewards -> envs -> agents -> algos -> trainer -> cli"
        )


def test_checker_catches_a_backward_import(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("from mmgym.trainer import loop\n")
    assert _imports(bad) == [(1, "mmgym.trainer")]


def test_import_mmgym_is_light() -> None:
    code = "import sys, mmgym; bad=[m for m in ('torch','transformers','vllm','deepspeed','ray','mani_skill','decord') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"import mmgym pulled in heavy modules: {out}"
