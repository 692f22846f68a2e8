"""Success and questions per ambiguity type for the Ask-to-Act scripted players.

Ask-to-Act ("Grounding Multimodal LLMs to Embodied Agents that Ask for Help with
Reinforcement Learning") evaluates whether an agent asks as few clarifying questions as
needed. This prints, for the minimal-asking oracle, never-ask (guess among candidates)
and always-ask (colour, size and location every time), one row per ambiguity type over
the fixed evaluation tasks ``task_index = 0 .. N-1``::

    python benchmarks/ask_to_act_baselines.py --episodes 300

``1/k`` is the mean chance of a uniform guess (k = number of candidates), the success a
never-ask agent should reach.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np

from mmgym.envs.ask_to_act import BASELINES, AskToActEnv, play_episode
from mmgym.envs.ask_to_act_world import AMBIGUITY_TYPES

COLUMNS = ("policy", "ambiguity", "episodes", "success", "1/k", "questions", "min questions", "extra questions", "wrong picks", "return")


def run(episodes: int, seed: int) -> list[tuple]:
    env = AskToActEnv()
    rows: list[tuple] = []
    for name, policy in BASELINES.items():
        rng = np.random.default_rng(seed)
        by_type: dict[str, list[dict]] = defaultdict(list)
        for i in range(episodes):
            info = play_episode(env, policy, rng, options={"task_index": i})
            by_type[info["ambiguity"]].append(info)
        by_type["all"] = [r for t in AMBIGUITY_TYPES for r in by_type[t]]
        for t in (*AMBIGUITY_TYPES, "all"):
            rs = by_type[t]
            if not rs:
                continue
            mean = lambda key: float(np.mean([float(r[key]) for r in rs]))  # noqa: E731
            rows.append((
                name, t, len(rs), f"{mean('success'):.3f}", f"{np.mean([1 / r['num_candidates'] for r in rs]):.3f}",
                f"{mean('questions_asked'):.2f}", f"{mean('min_questions'):.2f}",
                f"{np.mean([max(0, r['questions_asked'] - r['min_questions']) for r in rs]):.2f}", f"{mean('wrong_picks'):.2f}", f"{mean('return'):.3f}",
            ))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=300, help="fixed evaluation tasks 0..N-1 per policy")
    p.add_argument("--seed", type=int, default=0, help="seed of the baselines' guesses")
    args = p.parse_args()
    rows = run(args.episodes, args.seed)
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |")


if __name__ == "__main__":
    main()
