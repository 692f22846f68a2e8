"""Rebuild the shipped warm-started checkpoint of the embedded tiny model (embedded:focus_warm).

Three stages on the default task (ChainOfFocus, region zoom on a 2x2 grid), starting from
``embedded:focus_read`` (the previous warm start, which reads a zoomed stripe marker; its
own recipe is in its ``warm_start.json``):

A. ``scripts/probe_localisation.py --attn-sup 1 --mask-number`` (500 steps, lr 1e-3): the
   first turn only; attention at the position that predicts the region number is pushed
   onto the marker's image token, and the number itself is left out of the loss.
B. the same plus ``--code-sup 1`` (400 steps, lr 5e-4): the marker's image token must keep
   the cell's tint code, so the vision tower stays legible while attention finds the marker.
C. ``examples/focus_warm_start.yaml``: 1024 oracle episodes whose zoom is always random
   (``zoom_noise=1``), guessed answers left out of the loss (``mask_guesses``), 300 steps.

The result reads a zoomed marker, has the features to find it, and names a region
uniformly at random: RL (``mmgym train``) has to teach it which one. About 15 minutes on
2 CPU cores. Deterministic for a given seed and machine.

    python scripts/build_warm_start.py [--work DIR] [--from embedded:focus_read] [--dest DIR] [key=value ...]

``key=value`` overrides go to stage C.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from mmgym.core import load_config
from mmgym.trainer import TrainConfig, train
from mmgym.trainer.common import model_dir

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "mmgym" / "assets" / "tiny_qwen2_5_vl_focus_warm"
PROBE = ROOT / "scripts" / "probe_localisation.py"
STAGE_A = ["--attn-sup", "1.0", "--mask-number", "--steps", "500", "--lr", "1e-3", "--train-tasks", "3000"]
STAGE_B = ["--attn-sup", "1.0", "--mask-number", "--code-sup", "1.0", "--steps", "400", "--lr", "5e-4", "--train-tasks", "3000"]


def probe_stage(model: str, args: list[str], save: Path) -> None:
    cmd = [sys.executable, str(PROBE), "--model", model, *args, "--eval-every", "1000000", "--save", str(save)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/warm_start_build", help="folder for the stages' models and run")
    ap.add_argument("--from", dest="start", default="embedded:focus_read")
    ap.add_argument("--dest", type=Path, default=DEST,
                    help="where the model goes (default: the shipped asset, replaced; another folder must not exist)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    work, dest = Path(args.work), args.dest
    if dest.resolve() != DEST.resolve() and dest.exists():
        sys.exit(f"{dest} exists; pick another --dest folder (only the shipped asset is replaced)")
    if work.exists():
        sys.exit(f"{work} exists; pick another --work folder (nothing is overwritten)")
    work.mkdir(parents=True)
    probe_stage(args.start, STAGE_A, work / "stage_a")
    probe_stage(str(work / "stage_a"), STAGE_B, work / "stage_b")
    cfg = load_config(TrainConfig, ROOT / "examples" / "focus_warm_start.yaml",
                      [f"out_root={work}", "run_name=stage_c", f"model.path={work / 'stage_b'}", *args.overrides])
    summary = train(cfg)
    src = model_dir(summary["run_dir"])
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest)
    stages = [{"from": args.start, "script": "scripts/probe_localisation.py", "args": STAGE_A},
              {"from": "stage A", "script": "scripts/probe_localisation.py", "args": STAGE_B},
              {"from": "stage B", "config": "examples/focus_warm_start.yaml", "overrides": args.overrides}]
    (dest / "warm_start.json").write_text(json.dumps({"built_by": "python scripts/build_warm_start.py", "stages": stages,
                                                       "held_out_success": summary.get("warm_start")}, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"warm start copied to {dest}")


if __name__ == "__main__":
    main()
