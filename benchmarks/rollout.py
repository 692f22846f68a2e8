"""Rollout throughput of the embedded tiny Qwen2.5-VL on ChainOfFocus, and vision-encoder
calls per episode.

    python benchmarks/rollout.py [--tasks 4] [--group 8] [--turns 3] [--max-new-tokens 32] [--threads 2]

Plays ``tasks x group`` episodes (one ``generate`` call per turn over every running
episode) with ``HFPolicy()`` on CPU, after one warm-up collection, and prints:

- episodes/s and generated tokens/s over the whole collection (env steps included),
  plus prompt tokens/s (prompt tokens prefilled per generate call, image tokens
  included) and the share of wall time spent inside ``generate``;
- vision-encoder image encodes per episode against images shown per episode, with the
  per-episode feature cache (the default) and without it (``cache_vision=False``),
  where every turn re-encodes every image still in the context. Goal: one encode per
  image.

The untrained model's replies never make a valid zoom, so its episodes hold one image.
A second measurement ("oracle actions") still samples every reply with the model (same
compute) but sends the env's oracle reply instead, as a trained agent would zoom; the
oracle text then enters the context as given text, and zoom images pile up per episode.

Threads default to 2 (the machine's cores); the machine is shared, so run it when idle.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

import mmgym  # noqa: F401  (registers env ids)
from mmgym.agents import HFPolicy, RolloutCollector, RolloutSettings, SamplingParams
from mmgym.agents.tokens import TokenState


class Timed:
    """Wraps a policy: wall time inside generate and prompt tokens prefilled; with
    ``oracle=True`` the env gets its oracle's reply instead of the sampled one."""

    def __init__(self, policy: HFPolicy, oracle: bool = False):
        self.policy = policy
        self.oracle = oracle
        self.seconds = 0.0
        self.prompt_tokens = 0

    def generate(self, conversations, sampling):
        t0 = time.perf_counter()
        gens = self.policy.generate(conversations, sampling)
        self.seconds += time.perf_counter() - t0
        for c, g in zip(conversations, gens):
            if isinstance(c.state, TokenState) and g.finish_reason in ("stop", "length"):
                self.prompt_tokens += len(c.state) - len(g.token_ids)
            if self.oracle and g.finish_reason in ("stop", "length"):
                g.text = c.meta["env"].unwrapped.oracle_action()
        return gens

    def logprobs(self, batch):
        return self.policy.logprobs(batch)


def run(policy: HFPolicy, args: argparse.Namespace, seed: int, oracle: bool = False) -> dict[str, Any]:
    settings = RolloutSettings(sampling=SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=seed),
                               max_turns=args.turns, keep_images=False)
    col = RolloutCollector("mmgym/ChainOfFocus-v0", num_tasks=args.tasks, group_size=args.group, settings=settings)
    timed = Timed(policy, oracle)
    policy.vision_stats.reset()
    t0 = time.perf_counter()
    trajs = col.collect(timed, seeds=[seed * 1000 + i for i in range(args.tasks)])
    wall = time.perf_counter() - t0
    col.close()
    n = len(trajs)
    gen_tokens = sum(sum(t.action_mask) for t in trajs) if not oracle else None
    shown = sum(tn.num_images for t in trajs for tn in t.turns)
    return {
        "episodes": n,
        "wall_s": wall,
        "generate_s": timed.seconds,
        "episodes_per_s": n / wall,
        "generated_tokens_per_s": (gen_tokens if gen_tokens is not None else float("nan")) / wall,
        "prompt_tokens_per_s": timed.prompt_tokens / wall,
        "turns_per_episode": statistics.mean(t.num_turns for t in trajs),
        "images_shown_per_episode": shown / n,
        "image_encodes_per_episode": policy.vision_stats.images_encoded / n,
        "encodes_per_image": policy.vision_stats.images_encoded / max(1, shown),
        "vision_calls": policy.vision_stats.calls,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="timed collections (after one warm-up)")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    results: dict[str, Any] = {"config": vars(args)}
    for cache in (True, False):
        policy = HFPolicy(cache_vision=cache)
        results["params"] = policy.num_parameters()
        run(policy, args, seed=99)  # warm-up
        for oracle in (False, True):
            reps = [run(policy, args, seed=r, oracle=oracle) for r in range(args.repeats)]
            best = max(reps, key=lambda r: r["episodes_per_s"])
            results[("cache" if cache else "no_cache") + ("_oracle" if oracle else "")] = best
    if args.json:
        print(json.dumps(results))
        return
    c, nc = results["cache"], results["no_cache"]
    print(f"tiny Qwen2.5-VL ({results['params'] / 1e6:.2f} M params), ChainOfFocus-v0, {args.tasks} tasks x group {args.group}, "
          f"<= {args.turns} turns, <= {args.max_new_tokens} new tokens/turn, torch threads {args.threads}")
    print(f"  episodes/s             {c['episodes_per_s']:8.2f}   ({c['episodes']} episodes in {c['wall_s']:.2f} s, "
          f"{c['generate_s'] / c['wall_s']:.0%} inside generate)")
    print(f"  generated tokens/s     {c['generated_tokens_per_s']:8.0f}")
    print(f"  prompt tokens/s        {c['prompt_tokens_per_s']:8.0f}   (prefill, image tokens included)")
    print(f"  turns per episode      {c['turns_per_episode']:8.2f}")
    print(f"  images shown/episode   {c['images_shown_per_episode']:8.2f}")
    print(f"  vision encodes/episode {c['image_encodes_per_episode']:8.2f}   ({c['encodes_per_image']:.2f} per image, "
          f"{c['vision_calls']} batched encoder calls)")
    print(f"  without the feature cache: {nc['image_encodes_per_episode']:.2f} encodes/episode "
          f"({nc['encodes_per_image']:.2f} per image), {nc['episodes_per_s']:.2f} episodes/s")
    co, nco = results["cache_oracle"], results["no_cache_oracle"]
    print("oracle actions (the model samples every reply; the env gets the oracle's zooms and answer):")
    print(f"  episodes/s             {co['episodes_per_s']:8.2f}   turns/episode {co['turns_per_episode']:.2f}, "
          f"prompt tokens/s {co['prompt_tokens_per_s']:.0f}")
    print(f"  images shown/episode   {co['images_shown_per_episode']:8.2f}")
    print(f"  vision encodes/episode {co['image_encodes_per_episode']:8.2f}   ({co['encodes_per_image']:.2f} per image)")
    print(f"  without the feature cache: {nco['image_encodes_per_episode']:.2f} encodes/episode "
          f"({nco['encodes_per_image']:.2f} per image), {nco['episodes_per_s']:.2f} episodes/s")


if __name__ == "__main__":
    main()
