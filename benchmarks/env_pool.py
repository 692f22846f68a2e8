"""Env steps per second: 64 ChainOfFocus envs stepped by the oracle, 1 process vs the pool.

Run: python benchmarks/env_pool.py [--envs 64] [--workers 2] [--seconds 20] [--policy both] [--linger-ms 3]
Goal (issue "Scale"): the process pool on 2 cores reaches at least 1.7x the 1-process rate.

Both runs use the same asynchronous loop over the pool interface, with one of two scripted
policies; finished episodes reset with a new seed:

- ``parent`` (the headline): the policy runs in the parent, as a model does in an RL rollout,
  so a step is one request and one reply: the task's gold zooms (``gold_tool_calls`` of the
  reset info), then a random option. Same turns per episode and the same zoom and
  verification work as the oracle's episodes.
- ``oracle``: as soon as an env's result arrives, ask its worker for ``oracle_action``
  (``submit_call``; the oracle reads env state, so it runs where the env lives) and submit
  that action: two round trips per step, the second one pure transport.
The 1-process baseline is ``LocalEnvPool`` (same loop, envs in this process), measured with
OpenCV's default thread pool (which already spreads ChainOfFocus's canvas drawing over the
cores) and with one thread, as each pool worker runs. Resets (drawing a 1-2k px canvas)
dominate the cost; a zoom step is well under a millisecond.

The pool runs twice: with ``poll(linger_s=0.003)`` (after the first reply, the loop waits
3 ms and takes every reply that came meanwhile, so it wakes once per batch) and without
(it wakes for almost every reply). On 2 cores, each wake-up of the loop preempts a worker
in the middle of an env step.

With the embedded model generating the replies (episodes/s of whole ``collect`` calls, local
envs vs the pool, and the share of time spent waiting on envs): ``benchmarks/rollout_pool.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import mmgym  # noqa: F401
from mmgym.envs.pool import make_pool
from mmgym.envs.pool.worker import limit_threads


def parent_plan(info: dict, rng: random.Random) -> list[str]:
    """The ``parent`` policy's actions for one episode: the task's gold zooms (from the reset
    info, so the episode has the oracle's turns and zoom work), then a random option."""
    calls = [c for turn in info.get("gold_tool_calls") or [] for c in turn]
    return [f"<tool_call>{json.dumps(c)}</tool_call>" for c in calls] + [f"<answer>{rng.choice('ABCD')}</answer>"]


def run(pool, num_envs: int, seconds: float, policy: str = "parent", linger_s: float = 0.0) -> dict[str, float]:
    """Steps/s and episodes/s over ``seconds`` of scripted play on every env."""
    rng = random.Random(0)
    plans: dict[int, list[str]] = {}
    seed = 0
    for i in range(num_envs):
        pool.submit_reset(i, seed=seed)
        seed += 1
    steps = episodes = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        for i, r in pool.poll(timeout=1.0, linger_s=linger_s):
            if r.op == "call":
                pool.submit(i, r.value)
                continue
            if r.op == "step":
                steps += 1
                if r.done:
                    episodes += 1
                    pool.submit_reset(i, seed=seed)
                    seed += 1
                    continue
            if policy == "oracle":
                pool.submit_call(i, "oracle_action")
                continue
            if r.op == "reset":
                plans[i] = parent_plan(r.info, rng)
            pool.submit(i, plans[i].pop(0))
    dt = time.perf_counter() - t0
    while pool.pending():  # drain so close() is clean
        pool.poll(timeout=1.0)
    return {"steps_per_s": steps / dt, "episodes_per_s": episodes / dt, "steps": steps, "seconds": dt}


def compare(args: argparse.Namespace, policy: str) -> dict[str, object]:
    """1 process (default threads), the pool (with and without ``poll(linger_s=...)``), 1
    process on 1 thread: one policy, one run."""
    import cv2

    threads = cv2.getNumThreads()
    pool_name = f"pool_{args.workers}_workers"
    out: dict[str, object] = {}
    with make_pool("local", args.env_id, args.envs) as pool:
        out["one_process"] = run(pool, args.envs, args.seconds, policy)
    lingers = [(pool_name, args.linger_ms / 1000)] + ([(pool_name + "_no_linger", 0.0)] if args.linger_ms > 0 else [])
    for name, linger in lingers:
        with make_pool("process", args.env_id, args.envs, num_workers=args.workers, step_timeout_s=120.0) as pool:
            out[name] = run(pool, args.envs, args.seconds, policy, linger)
    limit_threads(1)  # the pool's workers run OpenCV single-threaded; the same for a 1-core baseline
    with make_pool("local", args.env_id, args.envs) as pool:
        out["one_process_1_thread"] = run(pool, args.envs, args.seconds, policy)
    limit_threads(threads)
    for name, _ in lingers:
        rate = out[name]["steps_per_s"]  # type: ignore[index]
        tag = name.removeprefix(pool_name)
        out["speedup" + tag + "_vs_one_process"] = rate / out["one_process"]["steps_per_s"]  # type: ignore[index]
        out["speedup" + tag + "_vs_one_process_1_thread"] = rate / out["one_process_1_thread"]["steps_per_s"]  # type: ignore[index]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--envs", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--env-id", default="mmgym/ChainOfFocus-v0")
    ap.add_argument("--policy", choices=("parent", "oracle", "both"), default="both")
    ap.add_argument("--linger-ms", type=float, default=3.0,
                    help="the pool's poll(linger_s=...): after a reply, collect others for this long (0: off; "
                         "when on, the pool also runs without it)")
    args = ap.parse_args()
    out: dict[str, object] = {"env": args.env_id, "envs": args.envs, "cpu_count": os.cpu_count()}
    for policy in ("parent", "oracle") if args.policy == "both" else (args.policy,):
        out[f"policy_{policy}"] = compare(args, policy)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
