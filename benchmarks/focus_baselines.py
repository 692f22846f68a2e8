"""ChainOfFocus: oracle vs an agent that answers from the first view alone, on the fixed
evaluation tasks (task_index 0..N-1), per question type and zoom mode.

Run: python benchmarks/focus_baselines.py [--episodes 200]
The first-view reader is generous (it is told where the markers are and template-matches
each option's glyph downsampled like the first view); near chance means zooming is needed.
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np

import mmgym  # noqa: F401
from mmgym.agents.episodes import run_episode
from mmgym.agents.scripted import FirstViewAgent, OracleAgent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--episodes", type=int, default=200)
    args = ap.parse_args()
    n = args.episodes
    print(f"{'zoom':<7}{'question':<11}{'n':>5}{'oracle':>9}{'first view':>12}")
    for zoom in ("bbox", "region"):
        env = gym.make("mmgym/ChainOfFocus-v0", zoom=zoom)
        oracle = [run_episode(env, OracleAgent(), task_index=i, keep_images=False) for i in range(n)]
        first, qtypes = [], []
        for i in range(n):
            first.append(run_episode(env, FirstViewAgent(), task_index=i, keep_images=False))
            qtypes.append(env.unwrapped.task.qtype)
        for q in ("attribute", "relative", "all"):
            idx = [i for i in range(n) if q == "all" or qtypes[i] == q]
            o = np.mean([oracle[i].success for i in idx])
            f = np.mean([first[i].success for i in idx])
            print(f"{zoom:<7}{q:<11}{len(idx):>5}{o:>9.3f}{f:>12.3f}")


if __name__ == "__main__":
    main()
