"""Env steps per second: 64 ChainOfFocus envs stepped by a scripted policy, 1 process vs the pool.

Run: python benchmarks/env_pool.py [--envs 64] [--workers 2] [--seconds 10] [--rounds 3] [--policy both] [--linger-ms 3]
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


def run(pool, num_envs: int, seconds: float, policy: str = "parent", linger_s: float = 0.0, warmup_s: float = 3.0) -> dict[str, float]:
    """Steps/s and episodes/s of scripted play on every env, in steady state: the loop runs
    ``warmup_s`` first (the first resets of all envs, ~2 s of drawing for 64 ChainOfFocus
    envs, fall in it), then counts for ``seconds``.

    The window opens when a ``poll`` returns after the warm-up, and only results of later
    polls count: they were computed after it opened. That holds for both kinds of pool: a
    ``LocalEnvPool`` runs each request inside ``submit`` (so a poll returns what the loop's
    previous submits computed), a process pool in its workers.
    """
    rng = random.Random(0)
    plans: dict[int, list[str]] = {}
    seed = 0
    steps = episodes = 0
    t_open: float | None = None
    warm_end = time.perf_counter() + warmup_s
    for i in range(num_envs):
        pool.submit_reset(i, seed=seed)
        seed += 1
    while True:
        results = pool.poll(timeout=1.0, linger_s=linger_s)
        now = time.perf_counter()
        if t_open is None:
            if now >= warm_end:
                t_open = now
        else:
            steps += sum(1 for _, r in results if r.op == "step")
            episodes += sum(1 for _, r in results if r.op == "step" and r.done)
            if now - t_open >= seconds:
                break
        for i, r in results:
            if r.op == "call":
                pool.submit(i, r.value)
                continue
            if r.op == "step" and r.done:
                pool.submit_reset(i, seed=seed)
                seed += 1
                continue
            if policy == "oracle":
                pool.submit_call(i, "oracle_action")
                continue
            if r.op == "reset":
                plans[i] = parent_plan(r.info, rng)
            pool.submit(i, plans[i].pop(0))
    dt = now - t_open
    while pool.pending():  # drain so close() is clean
        pool.poll(timeout=1.0)
    return {"steps_per_s": steps / dt, "episodes_per_s": episodes / dt, "steps": steps, "seconds": dt}


def compare(args: argparse.Namespace, policy: str) -> dict[str, object]:
    """One policy: one process (OpenCV's default threads and 1 thread) and the pool (with and
    without ``poll(linger_s=...)``), in ``args.rounds`` interleaved rounds.

    This VM's speed drifts by 10-30 % over minutes, so every round measures each variant once,
    back to back; a round's speedups divide rates taken within a minute of each other, and
    the summary is their median (with the min and max)."""
    import statistics

    import cv2

    threads = cv2.getNumThreads()
    pool_name = f"pool_{args.workers}_workers"
    lingers = [(pool_name, args.linger_ms / 1000)] + ([(pool_name + "_no_linger", 0.0)] if args.linger_ms > 0 else [])
    rates: dict[str, list[float]] = {}
    with make_pool("local", args.env_id, args.envs) as local, \
            make_pool("process", args.env_id, args.envs, num_workers=args.workers, step_timeout_s=120.0) as pool:
        for _ in range(args.rounds):
            limit_threads(threads)
            rates.setdefault("one_process", []).append(run(local, args.envs, args.seconds, policy)["steps_per_s"])
            for name, linger in lingers:
                rates.setdefault(name, []).append(run(pool, args.envs, args.seconds, policy, linger)["steps_per_s"])
            limit_threads(1)  # the pool's workers run OpenCV single-threaded; the same for a 1-core baseline
            rates.setdefault("one_process_1_thread", []).append(run(local, args.envs, args.seconds, policy)["steps_per_s"])
    limit_threads(threads)
    out: dict[str, object] = {"steps_per_s": {k: [round(v, 1) for v in vs] for k, vs in rates.items()}}
    for name, _ in lingers:
        tag = name.removeprefix(pool_name)
        for base in ("one_process", "one_process_1_thread"):
            ratios = [p / b for p, b in zip(rates[name], rates[base])]
            out[f"speedup{tag}_vs_{base}"] = {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
                                              "max": round(max(ratios), 3), "rounds": [round(r, 3) for r in ratios]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--envs", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10.0, help="counted seconds per measurement (after a 3 s warm-up)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; speedups are per-round ratios, summarised by the median")
    ap.add_argument("--env-id", default="mmgym/ChainOfFocus-v0")
    ap.add_argument("--policy", choices=("parent", "oracle", "both"), default="both")
    ap.add_argument("--linger-ms", type=float, default=3.0,
                    help="the pool's poll(linger_s=...): after a reply, collect others for this long (0: off; "
                         "when on, the pool also runs without it)")
    args = ap.parse_args()
    if args.rounds < 1 or args.seconds <= 0 or args.envs < 1:
        ap.error("--rounds and --envs must be >= 1 and --seconds > 0")
    out: dict[str, object] = {"env": args.env_id, "envs": args.envs, "cpu_count": os.cpu_count(), "seconds": args.seconds, "rounds": args.rounds}
    for policy in ("parent", "oracle") if args.policy == "both" else (args.policy,):
        out[f"policy_{policy}"] = compare(args, policy)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
