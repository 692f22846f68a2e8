"""Smoke runs of the diagnostic scripts: they start, train, and write what they promise."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_probe_localisation_with_attention_supervision(tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "probe_localisation.py"), "--train-tasks", "16", "--eval-tasks", "4",
           "--steps", "2", "--eval-every", "2", "--batch", "4", "--workers", "1", "--threads", "1",
           "--attn-sup", "1.0", "--vision-lr-scale", "0.5", "--set", "grid_code_alpha=0.6", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["env_kwargs"]["grid_code_alpha"] == 0.6
    last = result["curve"][-1]
    assert last["step"] == 2 and 0.0 <= last["hit"] <= 1.0
    # the attention term is a mean of -log(attention mass) over heads and layers: positive, finite
    assert math.isfinite(last["attn_loss"]) and last["attn_loss"] > 0.0
    assert last["loss"] > last["attn_loss"]  # the total adds the cross-entropy
