"""Plain-Python loop references for the vectorised estimators and losses.

Written from the formulas (shared/REFERENCES.md), one trajectory and one token at a time,
with dicts for grouping: slow and obvious on purpose. Inputs are ``AdvantageInputs``
converted to nested lists; outputs are nested lists of floats.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch

from mmgym.algos.advantages import AdvantageInputs, EstimatorConfig


def _lists(inp: AdvantageInputs) -> dict:
    d = {
        name: getattr(inp, name).tolist()
        for name in (
            "action_mask",
            "token_turn",
            "turn_rewards",
            "turn_mask",
            "state_keys",
            "group_ids",
            "outcome",
            "first_tool_turn",
        )
    }
    d["values"] = inp.values.tolist() if inp.values is not None else None
    d["turn_values"] = inp.turn_values.tolist() if inp.turn_values is not None else None
    d["token_rewards"] = inp.token_rewards.tolist() if inp.token_rewards is not None else None
    return d


def _mean_std(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, 0.0
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var)


def _normalise(x: float, xs: list[float], std: bool, eps: float) -> float:
    if len(xs) < 2 or max(xs) == min(xs):
        return 0.0
    mean, sd = _mean_std(xs)
    return (x - mean) / (sd + eps) if std else x - mean


def _tokens_from_seq(d: dict, per_seq: list[float]) -> list[list[float]]:
    return [[per_seq[b] if m else 0.0 for m in row] for b, row in enumerate(d["action_mask"])]


def _tokens_from_turns(d: dict, per_turn: list[list[float]]) -> list[list[float]]:
    out = []
    for b, row in enumerate(d["action_mask"]):
        k_max = len(per_turn[b])
        out.append(
            [
                per_turn[b][k] if m and 0 <= (k := d["token_turn"][b][t]) < k_max else 0.0
                for t, m in enumerate(row)
            ]
        )
    return out


def _whiten(adv: list[list[float]], mask: list[list[bool]]) -> list[list[float]]:
    xs = [a for ra, rm in zip(adv, mask) for a, m in zip(ra, rm) if m]
    if not xs:
        return [[0.0] * len(r) for r in adv]
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / max(len(xs) - 1, 1)
    scale = 1.0 / math.sqrt(var + 1e-8)
    return [[(a - mean) * scale if m else 0.0 for a, m in zip(ra, rm)] for ra, rm in zip(adv, mask)]


def _groups(values: list[float], groups: list[int]) -> dict[int, list[float]]:
    out: dict[int, list[float]] = defaultdict(list)
    for v, g in zip(values, groups):
        out[g].append(v)
    return out


# --------------------------------------------------------------------------- outcome


def grpo(inp: AdvantageInputs, cfg: EstimatorConfig, std: bool = True) -> list[list[float]]:
    d = _lists(inp)
    by = _groups(d["outcome"], d["group_ids"])
    per = [_normalise(r, by[g], std, cfg.eps) for r, g in zip(d["outcome"], d["group_ids"])]
    return _tokens_from_seq(d, per)


def dr_grpo(inp: AdvantageInputs, cfg: EstimatorConfig) -> list[list[float]]:
    return grpo(inp, cfg, std=False)


def rloo(inp: AdvantageInputs, cfg: EstimatorConfig) -> list[list[float]]:
    d = _lists(inp)
    per = []
    for i, (r, g) in enumerate(zip(d["outcome"], d["group_ids"])):
        others = [r2 for j, (r2, g2) in enumerate(zip(d["outcome"], d["group_ids"])) if g2 == g and j != i]
        per.append(r - sum(others) / len(others) if others else 0.0)
    return _tokens_from_seq(d, per)


def token_rewards(d: dict) -> list[list[float]]:
    out = []
    for b, row in enumerate(d["action_mask"]):
        r = [0.0] * len(row)
        last_end = None
        for k, real in enumerate(d["turn_mask"][b]):
            ends = [t for t, m in enumerate(row) if m and d["token_turn"][b][t] == k]
            if ends:
                last_end = max(ends)
            if real and last_end is not None:
                r[last_end] += d["turn_rewards"][b][k]
        if d["token_rewards"] is not None:
            r = [x + (d["token_rewards"][b][t] if row[t] else 0.0) for t, x in enumerate(r)]
        out.append(r)
    return out


def reinforce_pp(inp: AdvantageInputs, cfg: EstimatorConfig) -> list[list[float]]:
    d = _lists(inp)
    rewards = token_rewards(d)
    out = []
    for b, row in enumerate(d["action_mask"]):
        g, ret = 0.0, [0.0] * len(row)
        for t in reversed(range(len(row))):
            if row[t]:
                g = rewards[b][t] + cfg.gamma * g
                ret[t] = g
        out.append(ret)
    return _whiten(out, d["action_mask"]) if cfg.whiten else out


def reinforce_pp_baseline(inp: AdvantageInputs, cfg: EstimatorConfig) -> list[list[float]]:
    d = _lists(inp)
    adv = dr_grpo(inp, cfg)
    return _whiten(adv, d["action_mask"]) if cfg.whiten else adv


def _gae_row(rewards, values, mask, gamma, lam, dones=None):
    positions = [t for t, m in enumerate(mask) if m]
    adv = [0.0] * len(mask)
    last = 0.0
    for i in reversed(range(len(positions))):
        t = positions[i]
        end = i == len(positions) - 1 or (dones is not None and dones[t])
        next_v = 0.0 if end else values[positions[i + 1]]
        if end:
            last = 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv


def gae(inp: AdvantageInputs, cfg: EstimatorConfig) -> tuple[list[list[float]], list[list[float]]]:
    d = _lists(inp)
    rewards = token_rewards(d)
    adv, ret = [], []
    for b, row in enumerate(d["action_mask"]):
        a = _gae_row(rewards[b], d["values"][b], row, cfg.gamma, cfg.lam)
        adv.append(a)
        ret.append([a[t] + d["values"][b][t] if row[t] else 0.0 for t in range(len(row))])
    return (_whiten(adv, d["action_mask"]) if cfg.whiten else adv), ret


# --------------------------------------------------------------------------- turn level


def _step_returns(d: dict, gamma: float) -> list[list[float]]:
    out = []
    for b, mask in enumerate(d["turn_mask"]):
        g, ret = 0.0, [0.0] * len(mask)
        for k in reversed(range(len(mask))):
            if mask[k]:
                g = d["turn_rewards"][b][k] + gamma * g
                ret[k] = g
        out.append(ret)
    return out


def gigpo(inp: AdvantageInputs, cfg: EstimatorConfig) -> list[list[float]]:
    d = _lists(inp)
    std = cfg.gigpo_mode == "mean_std_norm"
    by = _groups(d["outcome"], d["group_ids"])
    a_ep = [_normalise(r, by[g], std, cfg.eps) for r, g in zip(d["outcome"], d["group_ids"])]
    returns = _step_returns(d, cfg.step_gamma)
    step_groups: dict[tuple[int, int], list[float]] = defaultdict(list)
    for b, mask in enumerate(d["turn_mask"]):
        for k, real in enumerate(mask):
            if real and d["state_keys"][b][k] >= 0:
                step_groups[(d["group_ids"][b], d["state_keys"][b][k])].append(returns[b][k])
    per_turn = []
    for b, mask in enumerate(d["turn_mask"]):
        row = []
        for k, real in enumerate(mask):
            key = d["state_keys"][b][k]
            a_step = (
                _normalise(returns[b][k], step_groups[(d["group_ids"][b], key)], std, cfg.eps)
                if real and key >= 0
                else 0.0
            )
            row.append(a_ep[b] + cfg.gigpo_weight * a_step)
        per_turn.append(row)
    return _tokens_from_turns(d, per_turn)


def bilevel_gae(inp: AdvantageInputs, cfg: EstimatorConfig) -> tuple[list[list[float]], list[list[float]]]:
    d = _lists(inp)
    rewards = token_rewards(d)
    adv_all, ret_all = [], []
    for b, row in enumerate(d["action_mask"]):
        values = d["values"][b]
        turns = []  # (k, end position) for real turns with tokens, in order
        for k, real in enumerate(d["turn_mask"][b]):
            ends = [t for t, m in enumerate(row) if m and d["token_turn"][b][t] == k]
            if real and ends:
                turns.append((k, max(ends)))
        v_turn = [d["turn_values"][b][k] if d["turn_values"] is not None else values[e] for k, e in turns]
        targets = {}
        last = 0.0
        for i in reversed(range(len(turns))):
            _, e = turns[i]
            next_v = v_turn[i + 1] if i + 1 < len(turns) else 0.0
            delta = rewards[b][e] + cfg.gamma_turn * next_v - v_turn[i]
            last = delta + cfg.gamma_turn * cfg.lam_turn * last
            targets[e] = last + v_turn[i]
        token_r = [targets.get(t, 0.0) for t in range(len(row))]
        dones = [t in targets for t in range(len(row))]
        a = _gae_row(token_r, values, row, cfg.gamma_token, cfg.lam, dones)
        adv_all.append(a)
        ret_all.append([a[t] + values[t] if row[t] else 0.0 for t in range(len(row))])
    return (_whiten(adv_all, d["action_mask"]) if cfg.whiten else adv_all), ret_all


def mt_grpo(inp: AdvantageInputs, cfg: EstimatorConfig) -> list[list[float]]:
    d = _lists(inp)
    r_turn = []
    for b, mask in enumerate(d["turn_mask"]):
        real = [k for k, m in enumerate(mask) if m]
        last = real[-1] if real else -1
        f = d["first_tool_turn"][b]
        r_turn.append(sum(d["turn_rewards"][b][k] for k in real if k <= f and k != last))
    by_t = _groups(r_turn, d["group_ids"])
    r_out = [o - rt if cfg.mt_outcome == "final" else o for o, rt in zip(d["outcome"], r_turn)]
    by_o = _groups(r_out, d["group_ids"])
    per_turn = []
    for b, mask in enumerate(d["turn_mask"]):
        g = d["group_ids"][b]
        a_t = _normalise(r_turn[b], by_t[g], True, cfg.eps)
        a_o = _normalise(r_out[b], by_o[g], True, cfg.eps)
        f = d["first_tool_turn"][b]
        per_turn.append([a_o + cfg.mt_lambda * a_t if k <= f else a_o for k in range(len(mask))])
    return _tokens_from_turns(d, per_turn)


def igpo(inp: AdvantageInputs, cfg: EstimatorConfig) -> list[list[float]]:
    d = _lists(inp)
    pools: dict[tuple[int, int], list[float]] = defaultdict(list)

    def kind(b: int, k: int) -> int:
        if cfg.igpo_norm == "joint":
            return 0
        real = [j for j, m in enumerate(d["turn_mask"][b]) if m]
        return int(k == real[-1])

    for b, mask in enumerate(d["turn_mask"]):
        for k, real in enumerate(mask):
            if real:
                pools[(d["group_ids"][b], kind(b, k))].append(d["turn_rewards"][b][k])
    per_turn = []
    for b, mask in enumerate(d["turn_mask"]):
        norm = [
            _normalise(d["turn_rewards"][b][k], pools[(d["group_ids"][b], kind(b, k))], True, cfg.eps) if real else 0.0
            for k, real in enumerate(mask)
        ]
        g, row = 0.0, [0.0] * len(mask)
        for k in reversed(range(len(mask))):
            if mask[k]:
                g = norm[k] + cfg.igpo_gamma * g
                row[k] = g
        per_turn.append(row)
    return _tokens_from_turns(d, per_turn)


REFERENCES = {
    "grpo": grpo,
    "dr_grpo": dr_grpo,
    "rloo": rloo,
    "reinforce_pp": reinforce_pp,
    "reinforce_pp_baseline": reinforce_pp_baseline,
    "gae": gae,
    "gigpo": gigpo,
    "bilevel_gae": bilevel_gae,
    "mt_grpo": mt_grpo,
    "igpo": igpo,
}


# --------------------------------------------------------------------------- random batches


def random_inputs(
    seed: int,
    batch: int,
    length: int,
    turns: int,
    group_size: int,
    *,
    dtype: torch.dtype = torch.float64,
    with_values: bool = True,
) -> AdvantageInputs:
    """A random but well-formed multi-turn batch.

    Each row: up to ``turns`` real turns (a prefix), each an env chunk then an action
    chunk; chunks that do not fit in ``length`` are cut, so late turns may have no tokens.
    Rewards and anchor keys come from small sets so ties and shared anchors are common.
    """
    rng = np.random.default_rng(seed)
    action = np.zeros((batch, length), dtype=bool)
    token_turn = np.full((batch, length), -1, dtype=np.int64)
    turn_mask = np.zeros((batch, turns), dtype=bool)
    turn_rewards = np.zeros((batch, turns))
    state_keys = np.full((batch, turns), -1, dtype=np.int64)
    for b in range(batch):
        n_turns = int(rng.integers(1, turns + 1))
        turn_mask[b, :n_turns] = True
        t = int(rng.integers(0, 3))
        for k in range(n_turns):
            n_act = int(rng.integers(0, 4)) if rng.random() < 0.15 else int(rng.integers(1, 4))
            stop = min(t + n_act, length)
            action[b, t:stop] = True
            token_turn[b, t:stop] = k
            t = stop + int(rng.integers(0, 3))
        turn_rewards[b, :n_turns] = rng.choice([0.0, 0.0, 0.5, 1.0, -0.25], size=n_turns)
        state_keys[b, :n_turns] = rng.choice([-1, 0, 1, 2, 3], size=n_turns)
    group_ids = 1000 + 7 * rng.permutation(batch // group_size + 1)[np.arange(batch) // group_size]
    outcome = turn_rewards.sum(axis=1)
    return AdvantageInputs(
        action_mask=torch.from_numpy(action),
        token_turn=torch.from_numpy(token_turn),
        turn_rewards=torch.from_numpy(turn_rewards).to(dtype),
        turn_mask=torch.from_numpy(turn_mask),
        state_keys=torch.from_numpy(state_keys),
        group_ids=torch.from_numpy(group_ids.astype(np.int64)),
        outcome=torch.from_numpy(outcome).to(dtype),
        first_tool_turn=torch.from_numpy(rng.integers(0, turns + 1, size=batch).astype(np.int64)),
        values=torch.from_numpy(rng.normal(size=(batch, length))).to(dtype) if with_values else None,
    )


# --------------------------------------------------------------------------- losses


def ppo_clip(logprobs, old, adv, mask, clip_low, clip_high, dual_clip=None):
    out = []
    for lr, orow, arow, mrow in zip(logprobs, old, adv, mask):
        row = []
        for lp, o, a, m in zip(lr, orow, arow, mrow):
            if not m:
                row.append(0.0)
                continue
            rho = math.exp(lp - o)
            loss = max(-a * rho, -a * min(max(rho, 1 - clip_low), 1 + clip_high))
            if dual_clip is not None and a < 0:
                loss = min(loss, -a * dual_clip)
            row.append(loss)
        out.append(row)
    return out


def gspo(logprobs, old, adv, mask, clip_low, clip_high):
    out = []
    for lr, orow, arow, mrow in zip(logprobs, old, adv, mask):
        n = sum(mrow)
        s = math.exp(sum(lp - o for lp, o, m in zip(lr, orow, mrow) if m) / max(n, 1))
        out.append(
            [max(-a * s, -a * min(max(s, 1 - clip_low), 1 + clip_high)) if m else 0.0 for a, m in zip(arow, mrow)]
        )
    return out
