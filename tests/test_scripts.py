"""Smoke runs of the diagnostic scripts: they start, train, and write what they promise."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_probe_localisation_with_attention_supervision(tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "probe_localisation.py"), "--train-tasks", "16", "--eval-tasks", "4",
           "--steps", "2", "--eval-every", "2", "--batch", "4", "--workers", "1", "--threads", "1",
           "--attn-sup", "1.0", "--code-sup", "0.5", "--vision-lr-scale", "0.5", "--set", "grid=4",
           "--model", "embedded:focus_read", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["env_kwargs"]["grid_code_alpha"] == 0.6
    last = result["curve"][-1]
    assert last["step"] == 2 and 0.0 <= last["hit"] <= 1.0
    # the attention term is a mean of -log(attention mass) over heads and layers: positive, finite
    assert math.isfinite(last["attn_loss"]) and last["attn_loss"] > 0.0
    # the code term is a 16-way cross-entropy from a fresh linear head: near log(16) at first
    assert math.isfinite(last["code_loss"]) and 0.5 < last["code_loss"] < 6.0
    assert last["loss"] > last["attn_loss"] + 0.5 * last["code_loss"]  # the total adds the number's cross-entropy


def test_probe_pushblock_trains_the_direction_and_labels_it_from_the_geometry(tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "probe_pushblock.py"), "--train-tasks", "16", "--eval-tasks", "8",
           "--steps", "2", "--eval-every", "1", "--batch", "4", "--threads", "1", "--set", "cameras=[wrist]",
           "--set", "image_size=64", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["env_kwargs"] == {"layout": "aligned", "chunk_size": 4, "cameras": ["wrist"], "image_size": 64}
    assert [c["step"] for c in result["curve"]] == [0, 1, 2]
    assert all(0.0 <= c["acc"] <= 1.0 for c in result["curve"]) and math.isfinite(result["curve"][-1]["loss"])

    sys.path.insert(0, str(ROOT / "scripts"))
    from probe_pushblock import WORDS, make_tasks

    from mmgym.envs.scenes import PALETTE
    from mmgym.envs.vla import BLOCK_COLORS

    # the label names where the target lies from the block as seen in the top view (rows grow down)
    for views, text, d in make_tasks({"layout": "aligned", "cameras": ["top"]}, list(range(12)), True):
        img = views[0]
        colour = next(c for c in BLOCK_COLORS if f"the {c} block" in text)
        block = np.argwhere(np.all(img == PALETTE[colour], -1)).mean(0)
        goal = np.argwhere(np.all(img == PALETTE["green"], -1)).mean(0)
        dr, dc = goal - block
        expect = ("right" if dc > 0 else "left") if abs(dc) > abs(dr) else ("down" if dr > 0 else "up")
        assert WORDS[d] == expect


def test_number_positions_finds_every_digit_of_the_region_number() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    from probe_localisation import number_positions
    from transformers import AutoTokenizer

    from mmgym.trainer.common import model_dir

    tok = AutoTokenizer.from_pretrained(model_dir("embedded:focus_warm"))
    for k in (3, 14):
        prompt = tok("Where is it? 12 cells.")["input_ids"]
        target = tok(f'<tool_call>{{"name": "zoom", "arguments": {{"region": {k}}}}}</tool_call>')["input_ids"]
        ids, labels = prompt + target, [-100] * len(prompt) + target
        pos = number_positions(ids, labels, tok.decode)
        assert tok.decode([ids[j] for j in pos]).strip() == str(k)
        assert pos[0] > len(prompt)  # the digits in the prompt are not the target's
    try:
        number_positions(prompt, [-100] * len(prompt), tok.decode)
    except RuntimeError as e:
        assert "no region number" in str(e)
    else:
        raise AssertionError("a target without a region number must be refused")


def test_eval_oracle_zoom_zooms_with_the_oracle_then_lets_the_model_answer() -> None:
    cmd = [sys.executable, str(ROOT / "scripts" / "eval_oracle_zoom.py"), "embedded:focus_warm", "--episodes", "4"]
    proc = subprocess.run(cmd, cwd=ROOT / "scripts", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["episodes"] == 4.0
    assert result["zoom_hit"] == 1.0  # every first turn is the oracle's zoom onto the target
    assert result["turns"] == 2.0 and 0.0 <= result["success"] <= 1.0  # then the model answers


def test_eval_oracle_zoom_takes_any_env_whose_oracle_writes_the_first_turn(tmp_path: Path) -> None:
    sets = ["video_size=[160,120]", "video_fps=4", "duration=[20,24]", "num_videos=2", "overview_frames=4",
            "overview_size=64", "crop_size=96", "question_types=[letter_choice]", "sign_symbols=stripes",
            f"cache_dir={tmp_path}", "rubric=longvt"]
    cmd = [sys.executable, str(ROOT / "scripts" / "eval_oracle_zoom.py"), "embedded:base", "--episodes", "2",
           "--env", "mmgym/VideoFrames-v0", "--max-new-tokens", "8", *(a for kv in sets for a in ("--set", kv))]
    proc = subprocess.run(cmd, cwd=ROOT / "scripts", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["env"] == "mmgym/VideoFrames-v0" and result["episodes"] == 2.0
    # the oracle's crop is the first turn: one tool call, overlapping the sign's span
    assert result["tool_calls"] >= 1.0 and result["term/crop_tiou"] > 0.3
