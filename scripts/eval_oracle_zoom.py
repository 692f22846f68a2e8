"""Held-out ChainOfFocus success when the first turn's zoom is the oracle's.

(Any env with ``--env ID``: its oracle writes the first reply, e.g. VideoFrames' crop
around the asked-about event; ``--set`` then starts from the env's own defaults.)

Separates reading from localisation: the env's oracle writes the first reply (the zoom
onto the target, teacher-forced through the model's own encoder, as in the warm start's
demonstrations) and the model answers from what that zoom shows, greedily, on the fixed
evaluation tasks (``task_index`` 0..N-1). With 4 options, chance is 0.25.

    python scripts/eval_oracle_zoom.py embedded:focus_warm [--set grid_code_alpha=0.6] [--episodes 200]
    python scripts/eval_oracle_zoom.py RUN/checkpoints/step_0000000/model --env mmgym/VideoFrames-v0 \
        --set rubric=longvt --set 'question_types=[letter_choice]' --set sign_symbols=stripes --max-new-tokens 48
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from probe_localisation import env_kwargs, parse_sets


class OracleFirstTurn:
    """The oracle's reply on an episode's first turn, the model's on every later turn."""

    def __init__(self, policy: Any):
        from mmgym.trainer.common import DemonstrationPolicy

        self.policy = policy
        self.oracle = DemonstrationPolicy(policy)

    def generate(self, conversations: Sequence[Any], sampling: Any) -> list[Any]:
        first = [c.turn == 0 for c in conversations]
        if all(first):
            return self.oracle.generate(conversations, sampling)
        if any(first):
            raise RuntimeError("episodes of one batch are on different turns; run them in lock-step")
        return self.policy.generate(conversations, sampling)

    def logprobs(self, batch: Any) -> Any:
        return self.policy.logprobs(batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--set", action="append", default=[], help="env kwarg override key=value")
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--env", default=None, help="another env id (default: ChainOfFocus with the default recipe's kwargs)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()

    import torch

    from mmgym.agents import HFPolicy
    from mmgym.trainer.common import evaluate, model_dir

    torch.set_num_threads(args.threads)
    policy = HFPolicy(model_dir(args.model))
    if args.env is None:
        env_id, kwargs = "mmgym/ChainOfFocus-v0", env_kwargs(args.set)
    else:
        env_id, kwargs = args.env, parse_sets(args.set)
    metrics, _ = evaluate(OracleFirstTurn(policy), env_id, kwargs, episodes=args.episodes,
                          max_new_tokens=args.max_new_tokens, tool_schemas=False)
    print(json.dumps({"model": args.model, "env": env_id, "set": args.set, **metrics}, indent=2))


if __name__ == "__main__":
    main()
