"""Rollout episodes/s with the embedded model generating: envs in this process vs the env pool.

Run: python benchmarks/rollout_pool.py [--collects 4] [--tasks 8] [--group 8] [--workers 2] [--threads N]

The model-in-the-loop companion of ``benchmarks/env_pool.py`` (which steps envs with a
scripted oracle and no model). Plays what one RL iteration of the main job plays: ``--collects``
``RolloutCollector.collect`` calls of ``--tasks`` tasks x ``--group`` episodes (64 episodes
each by default), sampled by ``HFPolicy`` (the shipped warm start ``embedded:focus_warm`` by
default, which zooms, so episodes take the env's two turns) at temperature 1 with
``max_new_tokens=32``, ``tool_schemas=False``, ``keep_images=False`` and the main job's env
kwargs (``mmgym.trainer.config._default_env_kwargs``). It does so twice in one run, with
``backend="local"`` (``GroupRunner``s in this process) and ``backend="process"``
(``--workers`` env worker processes), each after one warm-up collect (not timed; it also
starts the workers), on the same task seeds and the same sampler seeds, so both backends play
the same episodes as far as the model's numerics allow.

A thin proxy around the policy times every ``policy.generate`` call; the rest of each
collect's wall time is env resets and steps, waiting on the pool, and the collector's
bookkeeping. "env wait share" is that rest over the wall time. ``process / local`` is the
ratio of episodes/s.

Caveat: on a 2-core machine the model and the env workers compete for the same cores. With
``backend="process"`` the workers' env steps overlap each other, but not the model: the
collector submits a turn's actions only after the batched ``generate`` call returns and waits
for every result before the next call, and torch's threads (``--threads``) share the cores
with the workers. The ratio measured here is the end-to-end gain one RL iteration would see on
this machine, not the env pool's own speedup (that is ``benchmarks/env_pool.py``). Run it
when the machine is otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

import mmgym  # noqa: F401  (registers env ids)
from mmgym.agents import HFPolicy, RolloutCollector, RolloutSettings, SamplingParams
from mmgym.agents.chat import Conversation
from mmgym.agents.policy import Generation
from mmgym.trainer.common import model_dir
from mmgym.trainer.config import _default_env_kwargs

ENV_ID = "mmgym/ChainOfFocus-v0"


class TimedPolicy:
    """Forwards everything to ``policy``; adds up wall time and calls inside ``generate``."""

    def __init__(self, policy: Any):
        self._policy = policy
        self.seconds = 0.0
        self.calls = 0

    def generate(self, conversations: Sequence[Conversation], sampling: SamplingParams) -> list[Generation]:
        t0 = time.perf_counter()
        try:
            return self._policy.generate(conversations, sampling)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1

    def __getattr__(self, name: str) -> Any:  # logprob_temperature, tokenizer, ...
        return getattr(self._policy, name)


def run_backend(policy: HFPolicy, backend: str, args: argparse.Namespace) -> dict[str, Any]:
    """One warm-up collect, then ``args.collects`` timed ones; totals over the timed ones."""
    pool_kwargs = {"num_workers": args.workers, "step_timeout_s": 120.0} if backend != "local" else None
    col = RolloutCollector(ENV_ID, num_tasks=args.tasks, group_size=args.group, env_kwargs=_default_env_kwargs(),
                           backend=backend, pool_kwargs=pool_kwargs)

    def collect(r: int, timed: TimedPolicy) -> tuple[list[Any], float]:
        # Task and sampler seeds depend only on r, so both backends play the same episodes.
        settings = RolloutSettings(sampling=SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=10_000 + r),
                                   keep_images=False, tool_schemas=False)
        seeds = [1_000 * r + t for t in range(args.tasks)]
        t0 = time.perf_counter()
        trajs = col.collect(timed, seeds=seeds, settings=settings)
        return trajs, time.perf_counter() - t0

    try:
        collect(args.collects, TimedPolicy(policy))  # warm-up: a seed no timed collect uses
        timed = TimedPolicy(policy)
        walls, trajs, tokens, turns = [], [], 0, 0
        for r in range(args.collects):
            out, wall = collect(r, timed)
            walls.append(wall)
            trajs += out
            tokens += int(col.stats.get("generated_tokens", 0))
            turns += int(col.stats.get("turns", 0))
    finally:
        col.close()
    total = sum(walls)
    n = len(trajs)
    return {
        "episodes": n,
        "total_s": total,
        "episodes_per_s": n / total,
        "generate_s": timed.seconds,
        "rest_s": total - timed.seconds,
        "env_wait_share": (total - timed.seconds) / total,
        "generate_calls": timed.calls,
        "generated_tokens": tokens,
        "env_steps": turns,
        "turns_per_episode": statistics.mean(t.num_turns for t in trajs),
        "success": statistics.mean(float(t.success) for t in trajs),
        "env_errors": sum(t.termination_reason == "env_error" for t in trajs),
        "collect_s": walls,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--collects", type=int, default=4, help="timed collect() calls per backend (after one warm-up)")
    ap.add_argument("--tasks", type=int, default=8, help="tasks per collect")
    ap.add_argument("--group", type=int, default=8, help="episodes per task")
    ap.add_argument("--workers", type=int, default=2, help="env worker processes of the process backend")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own default)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--model", default="embedded:focus_warm", help="embedded:NAME, a run, checkpoint or model folder")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(0)

    policy = HFPolicy(str(model_dir(args.model)))
    results = {backend: run_backend(policy, backend, args) for backend in ("local", "process")}
    ratio = results["process"]["episodes_per_s"] / results["local"]["episodes_per_s"]

    print(f"{ENV_ID} (main job's env kwargs), model {args.model}, {args.collects} collects x {args.tasks} tasks x "
          f"{args.group} episodes per backend, <= {args.max_new_tokens} new tokens/turn, temperature 1")
    source = "--threads" if args.threads is not None else "torch's default"
    print(f"torch threads {threads} ({source}), "
          f"process backend: {args.workers} workers, cpu_count {os.cpu_count()}")
    print(f"{'backend':<9} {'episodes':>8} {'total s':>8} {'episodes/s':>10} {'generate s':>10} {'rest s':>8} "
          f"{'env wait':>8} {'turns/ep':>8} {'success':>7}")
    for name, r in results.items():
        print(f"{name:<9} {r['episodes']:>8} {r['total_s']:>8.2f} {r['episodes_per_s']:>10.2f} {r['generate_s']:>10.2f} "
              f"{r['rest_s']:>8.2f} {r['env_wait_share']:>8.0%} {r['turns_per_episode']:>8.2f} {r['success']:>7.2f}")
    print(f"process / local episodes/s: {ratio:.2f}x")
    out = {"env": ENV_ID, "model": args.model, "collects": args.collects, "tasks": args.tasks, "group": args.group,
           "workers": args.workers, "max_new_tokens": args.max_new_tokens, "torch_threads": threads,
           "threads_flag": args.threads, "cpu_count": os.cpu_count(), **results, "speedup_process_vs_local": ratio}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
