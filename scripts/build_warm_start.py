"""Rebuild the shipped warm-started checkpoint of the embedded tiny model.

Runs the supervised warm start of examples/focus_warm_start.yaml (oracle demonstrations
with 50 % random zooms, a fixed budget) and copies the resulting model folder to
mmgym/assets/tiny_qwen2_5_vl_focus_warm. Deterministic for a given seed and machine.

    python scripts/build_warm_start.py [--out-root runs] [key=value ...]

The shipped copy was built in two stages (see its warm_start.json): first from
``embedded:base`` on the first view with grid lines and digits (600 steps, lr 5e-4), then
``model.path=<stage 1 run> sft.steps=1200`` on the default view (tinted grid cells).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from mmgym.core import load_config
from mmgym.trainer import TrainConfig, train
from mmgym.trainer.common import model_dir

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "mmgym" / "assets" / "tiny_qwen2_5_vl_focus_warm"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-root", default="runs")
    ap.add_argument("--run-name", default="warm_start")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(TrainConfig, ROOT / "examples" / "focus_warm_start.yaml",
                      [f"out_root={args.out_root}", f"run_name={args.run_name}", *args.overrides])
    summary = train(cfg)
    src = model_dir(summary["run_dir"])
    if DEST.exists():
        shutil.rmtree(DEST)
    shutil.copytree(src, DEST)
    (DEST / "warm_start.json").write_text(json.dumps({"config": "examples/focus_warm_start.yaml", "overrides": args.overrides,
                                                       "held_out_success": summary.get("warm_start")}, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"warm start copied to {DEST}")


if __name__ == "__main__":
    main()
