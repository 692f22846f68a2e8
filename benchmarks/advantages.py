"""Time the vectorised GRPO, GAE and GiGPO estimators against plain references.

    python benchmarks/advantages.py [--batch 65536] [--length 64] [--group 8] [--turns 4]

Batch: B trajectories x T tokens, groups of G, K turns per trajectory (each turn = a few
env tokens then generated tokens), 0/1 outcomes, random turn rewards, values and anchor
states. For each estimator it prints ms per call of mmgym's version next to references
run in the same process:

- GRPO: a straightforward scatter implementation (unique + scatter_add_ for count, sum
  and squared deviations) and a Python loop with a dict of groups;
- GAE: a per-trajectory, per-timestep Python loop (as in verl's multi-turn GAE);
- GiGPO: episode and anchor-state step groups built with Python dicts (as in verl-agent),
  token broadcast with the same tensor op as mmgym.

Python loops that would take minutes run on a subset of trajectories and are scaled up
linearly (they are linear in B); the printout says so. Each reference's output is
checked against mmgym's on the trajectories it ran. Threads default to 1: the machine is
shared and OpenMP threads that compete for cores make timings meaningless.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import defaultdict

import torch

from mmgym.algos import ESTIMATORS, AdvantageInputs, EstimatorConfig, broadcast_turn_values


def make_inputs(batch: int, length: int, group: int, turns: int, seed: int = 0) -> AdvantageInputs:
    g = torch.Generator().manual_seed(seed)
    per_turn = length // turns
    env = max(1, per_turn // 4)
    pos = torch.arange(length)
    turn_of_pos = pos // per_turn
    generated = (pos % per_turn >= env) & (turn_of_pos < turns)
    token_turn = torch.where(generated, turn_of_pos, -1).expand(batch, length).contiguous()
    turn_rewards = torch.randint(0, 3, (batch, turns), generator=g).float() * 0.1
    outcome_bit = torch.randint(0, 2, (batch,), generator=g).float()
    turn_rewards[:, -1] += outcome_bit
    return AdvantageInputs(
        action_mask=token_turn >= 0,
        token_turn=token_turn,
        turn_rewards=turn_rewards,
        turn_mask=torch.ones(batch, turns, dtype=torch.bool),
        # few distinct states per turn index so that anchors recur across a group
        state_keys=torch.randint(0, 3, (batch, turns), generator=g) + 3 * torch.arange(turns),
        group_ids=torch.arange(batch) // group,
        outcome=turn_rewards.sum(1),
        first_tool_turn=torch.zeros(batch, dtype=torch.long),
        values=torch.randn(batch, length, generator=g),
    )


def subset(inputs: AdvantageInputs, n: int) -> AdvantageInputs:
    return AdvantageInputs(
        **{
            f: getattr(inputs, f)[:n] if isinstance(getattr(inputs, f), torch.Tensor) else getattr(inputs, f)
            for f in AdvantageInputs.__dataclass_fields__
        }
    )


def timed(fn, repeat: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, out


# --------------------------------------------------------------------------- references


def grpo_scatter(inputs: AdvantageInputs, eps: float = 1e-6) -> torch.Tensor:
    """The usual scatter implementation of GRPO (unique + scatter_add_)."""
    r = inputs.outcome
    uniq, inv = torch.unique(inputs.group_ids, return_inverse=True)
    n = uniq.numel()
    count = torch.zeros(n).scatter_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros(n).scatter_add_(0, inv, r) / count
    dev = r - mean[inv]
    var = torch.zeros(n).scatter_add_(0, inv, dev * dev) / (count - 1).clamp(min=1)
    adv = dev / (var.sqrt()[inv] + eps)
    return adv.unsqueeze(-1) * inputs.action_mask


def grpo_loop(inputs: AdvantageInputs, eps: float = 1e-6) -> torch.Tensor:
    rewards, groups = inputs.outcome.tolist(), inputs.group_ids.tolist()
    by_group: dict[int, list[float]] = defaultdict(list)
    for r, gid in zip(rewards, groups):
        by_group[gid].append(r)
    stats = {}
    for gid, rs in by_group.items():
        mean = sum(rs) / len(rs)
        sd = math.sqrt(sum((x - mean) ** 2 for x in rs) / (len(rs) - 1)) if len(rs) > 1 else 0.0
        stats[gid] = (mean, sd)
    adv = [0.0 if max(by_group[gid]) == min(by_group[gid]) else (r - stats[gid][0]) / (stats[gid][1] + eps)
           for r, gid in zip(rewards, groups)]
    return torch.tensor(adv).unsqueeze(-1) * inputs.action_mask


def gae_loop(inputs: AdvantageInputs, gamma: float, lam: float) -> torch.Tensor:
    """Per trajectory, per timestep: reward at each turn's last token, GAE over action tokens."""
    mask, turn = inputs.action_mask.tolist(), inputs.token_turn.tolist()
    values, rewards = inputs.values.tolist(), inputs.turn_rewards.tolist()
    out = []
    for b in range(len(mask)):
        positions = [t for t, m in enumerate(mask[b]) if m]
        row_r = [0.0] * len(mask[b])
        for i, t in enumerate(positions):  # turn end = last token before the turn changes
            if i == len(positions) - 1 or turn[b][positions[i + 1]] != turn[b][t]:
                row_r[t] += rewards[b][turn[b][t]]
        adv = [0.0] * len(mask[b])
        last, next_v = 0.0, 0.0
        for t in reversed(positions):
            delta = row_r[t] + gamma * next_v - values[b][t]
            last = delta + gamma * lam * last
            adv[t] = last
            next_v = values[b][t]
        out.append(adv)
    adv_t = torch.tensor(out)
    m = inputs.action_mask.float()
    mean = (adv_t * m).sum() / m.sum()
    var = (((adv_t - mean) ** 2) * m).sum() / (m.sum() - 1)
    return (adv_t - mean) * torch.rsqrt(var + 1e-8) * m


def gigpo_loop(inputs: AdvantageInputs, gamma: float, weight: float = 1.0) -> torch.Tensor:
    """verl-agent style: dicts for episode groups and anchor-state step groups (mean_norm)."""
    groups, outcome = inputs.group_ids.tolist(), inputs.outcome.tolist()
    rewards, keys, tmask = inputs.turn_rewards.tolist(), inputs.state_keys.tolist(), inputs.turn_mask.tolist()
    ep: dict[int, list[float]] = defaultdict(list)
    for gid, r in zip(groups, outcome):
        ep[gid].append(r)
    ep_mean = {gid: sum(v) / len(v) for gid, v in ep.items()}
    returns = []
    for b in range(len(groups)):
        g, row = 0.0, [0.0] * len(rewards[b])
        for k in reversed(range(len(row))):
            if tmask[b][k]:
                g = rewards[b][k] + gamma * g
                row[k] = g
        returns.append(row)
    step: dict[tuple[int, int], list[float]] = defaultdict(list)
    for b, gid in enumerate(groups):
        for k, key in enumerate(keys[b]):
            if tmask[b][k] and key >= 0:
                step[(gid, key)].append(returns[b][k])
    step_mean = {sk: sum(v) / len(v) for sk, v in step.items()}
    per_turn = []
    for b, gid in enumerate(groups):
        a_ep = outcome[b] - ep_mean[gid]
        per_turn.append([
            a_ep + weight * (returns[b][k] - step_mean[(gid, key)] if tmask[b][k] and key >= 0 else 0.0)
            for k, key in enumerate(keys[b])
        ])
    return broadcast_turn_values(torch.tensor(per_turn), inputs.token_turn, inputs.action_mask)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=65536)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--loop-subset", type=int, default=4096, help="trajectories for the slow Python loops")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    inputs = make_inputs(args.batch, args.length, args.group, args.turns)
    n_sub = min(args.loop_subset, args.batch) // args.group * args.group or args.batch
    small = subset(inputs, n_sub)
    scale = args.batch / n_sub
    print(
        f"B={args.batch} trajectories x T={args.length} tokens, groups of {args.group}, "
        f"K={args.turns} turns; torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
        f"median of {args.repeat} calls"
    )
    rows: list[tuple[str, str, float, str]] = []

    def check(name: str, got: torch.Tensor, want: torch.Tensor) -> str:
        err = (got - want).abs().max().item()
        if err > 1e-3:
            raise SystemExit(f"{name}: reference disagrees with mmgym (max abs diff {err:.3g})")
        return f"max |diff| {err:.1e}"

    # GRPO
    cfg = EstimatorConfig(estimator="grpo")
    grpo = ESTIMATORS.get("grpo")
    ms, out = timed(lambda: grpo(inputs, cfg).advantages, args.repeat)
    rows.append(("grpo", "mmgym (vectorised)", ms, ""))
    ms_ref, ref = timed(lambda: grpo_scatter(inputs), args.repeat)
    rows.append(("grpo", "scatter reference", ms_ref, check("grpo scatter", out, ref)))
    ms_loop, ref = timed(lambda: grpo_loop(inputs), 1)
    rows.append(("grpo", "Python loop (dict groups)", ms_loop, check("grpo loop", out, ref)))
    grpo_ms = (ms, ms_ref, ms_loop)

    # GAE
    cfg = EstimatorConfig(estimator="gae", gamma=0.99, lam=0.95)
    gae = ESTIMATORS.get("gae")
    ms, _ = timed(lambda: gae(inputs, cfg).advantages, args.repeat)
    rows.append(("gae", "mmgym (vectorised over B, scan over T)", ms, ""))
    ms_loop, ref = timed(lambda: gae_loop(small, 0.99, 0.95), 1)
    note = check("gae loop", gae(small, cfg).advantages, ref)
    rows.append(("gae", f"Python loop per timestep ({n_sub} traj x {scale:g})", ms_loop * scale, note))
    gae_ms = (ms, ms_loop * scale)

    # GiGPO
    cfg = EstimatorConfig(estimator="gigpo", step_gamma=0.95)
    gigpo = ESTIMATORS.get("gigpo")
    ms, out = timed(lambda: gigpo(inputs, cfg).advantages, args.repeat)
    rows.append(("gigpo", "mmgym (unique + scatter)", ms, ""))
    if args.batch * args.turns <= 300_000:
        ms_loop, ref = timed(lambda: gigpo_loop(inputs, 0.95), 1)
        note = check("gigpo loop", out, ref)
        rows.append(("gigpo", "Python dict grouping (full batch)", ms_loop, note))
    else:
        ms_loop, ref = timed(lambda: gigpo_loop(small, 0.95), 1)
        note = check("gigpo loop", gigpo(small, cfg).advantages, ref)
        ms_loop *= scale
        rows.append(("gigpo", f"Python dict grouping ({n_sub} traj x {scale:g})", ms_loop, note))
    gigpo_ms = (ms, ms_loop)

    width = max(len(r[1]) for r in rows)
    print(f"{'estimator':<10} {'implementation':<{width}} {'ms/call':>10}  check")
    for est, impl, value, note in rows:
        print(f"{est:<10} {impl:<{width}} {value:>10.1f}  {note}")
    print()
    print(
        f"grpo : {grpo_ms[1] / grpo_ms[0]:.2f}x the scatter reference's speed (goal >= 1), "
        f"{grpo_ms[2] / grpo_ms[0]:.0f}x the Python loop"
    )
    print(f"gae  : {gae_ms[1] / gae_ms[0]:.0f}x faster than the per-timestep loop (goal >= 5)")
    print(f"gigpo: {gigpo_ms[1] / gigpo_ms[0]:.0f}x faster than dict grouping (goal >= 10)")


if __name__ == "__main__":
    main()
