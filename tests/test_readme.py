"""The README's code runs as pasted, and CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_python_blocks_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    for i, code in enumerate(blocks):
        code = code.replace('gym.register(id="my/BrightOrDark-v0"', 'gym.register(id=f"my/BrightOrDark{i}-v0"').replace('gym.make("my/BrightOrDark-v0")', 'gym.make(f"my/BrightOrDark{i}-v0")')
        exec(compile(code, f"README block {i}", "exec"), {"__name__": "__main__", "i": i})


def test_ci_runs_the_readme_test_command() -> None:
    quick = re.search(r"Then the two commands.*?```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert len(quick) == 2
    test_cmd = quick[1].strip()
    assert test_cmd.startswith("python -m pytest")
    assert test_cmd in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
