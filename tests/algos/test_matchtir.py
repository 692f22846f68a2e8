"""MatchTIR: call similarity, hard/soft assignment, turn rewards, dual-level advantage."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import replace

import numpy as np
import pytest
import torch

from mmgym.algos import ESTIMATORS, AdvantageInputs, EstimatorConfig
from mmgym.algos.matchtir import (
    MatchTIRConfig,
    MatchTIREstimatorConfig,
    call_similarity,
    hard_assignment,
    matchtir_turn_rewards,
    matchtir_turn_rewards_batch,
    similarity_matrix,
    sinkhorn_plan,
    sinkhorn_plan_batched,
    soft_assignment,
)
from mmgym.core import ToolCall

from . import _reference as ref

D = torch.float64


def call(name, **args):
    return {"name": name, "arguments": args}


# --------------------------------------------------------------------------- similarity


def test_call_similarity_by_hand():
    assert call_similarity(call("zoom", a=1), call("crop", a=1)) == 0.0
    # keys {a, b} vs {a, c}: IoU 1/3, one exact value (a) -> (1 + 1/3 + 1) / (2 + 2)
    assert call_similarity(call("f", a=1, b=2), call("f", a=1, c=3)) == pytest.approx(7 / 12)
    assert call_similarity(call("f"), call("f")) == 1.0
    assert call_similarity(call("f", a=1.0, b=[1, 2]), call("f", a=1, b=[1, 2])) == 1.0
    assert call_similarity(call("f", a=True), call("f", a=1)) == pytest.approx(2 / 3)  # True is not 1
    tc = ToolCall("f", {"a": 1})
    assert call_similarity(tc, call("f", a=2)) == pytest.approx(2 / 3)
    with pytest.raises(TypeError, match="ToolCall or a mapping"):
        call_similarity("f(a=1)", tc)


def test_hard_assignment_by_hand():
    # greedy would take 0.9 then 0.1; the optimum is 0.8 + 0.85
    sim = np.array([[0.9, 0.8], [0.85, 0.1]])
    np.testing.assert_allclose(hard_assignment(sim), [0.8, 0.85])
    # three predictions, one gold call: one is matched, two score 0
    np.testing.assert_allclose(hard_assignment(np.array([[0.2], [0.7], [0.5]])), [0.0, 0.7, 0.0])
    assert hard_assignment(np.zeros((0, 3))).shape == (0,)


def test_turn_rewards_by_hand():
    gold = [call("zoom", box=[0, 0, 4, 4]), call("answer", text="red")]
    turns = [
        [call("zoom", box=[0, 0, 4, 4])],  # exact: 1
        [call("zoom", box=[1, 1, 4, 4]), call("answer", text="red")],
        [],
    ]
    # 3 predictions vs 2 gold: zoom#1 -> gold zoom (1.0), answer -> gold answer (1.0), the
    # second zoom (sim 2/3 to gold zoom) is left unmatched (0).
    r = matchtir_turn_rewards(turns, gold)
    assert r == pytest.approx([1.0, 0.5, 0.0])


def test_batch_skips_tasks_without_gold_and_counts_them():
    turns = [[[call("f", a=1)]], [[call("f", a=1)]], [[call("f", a=2)], []]]
    rewards, has_gold, metrics = matchtir_turn_rewards_batch(
        turns, [[call("f", a=1)], None, []], num_turns=3
    )
    assert has_gold.tolist() == [True, False, False]
    assert metrics == {"matchtir_skipped": 2.0}
    torch.testing.assert_close(rewards, torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="num_turns"):
        matchtir_turn_rewards_batch([[[], [], []]], [[call("f")]], num_turns=2)


# --------------------------------------------------------------------------- loop references


def _brute_force_hard(sim: np.ndarray) -> float:
    p, g = sim.shape
    best = 0.0
    for cols in itertools.permutations(range(max(p, g)), p):
        best = max(best, sum(sim[i, c] for i, c in enumerate(cols) if c < g))
    return best


def _loop_sinkhorn(sim: np.ndarray, reg: float, iters: int) -> np.ndarray:
    n = max(sim.shape)
    s = np.zeros((n, n))
    s[: sim.shape[0], : sim.shape[1]] = sim
    k = [[math.exp(s[i][j] / reg) for j in range(n)] for i in range(n)]
    u, v = [1.0] * n, [1.0] * n
    for _ in range(iters):
        u = [1.0 / sum(k[i][j] * v[j] for j in range(n)) for i in range(n)]
        v = [1.0 / sum(k[i][j] * u[i] for i in range(n)) for j in range(n)]
    return np.array([[u[i] * k[i][j] * v[j] for j in range(n)] for i in range(n)])[: sim.shape[0], : sim.shape[1]]


@pytest.mark.parametrize("p, g", [(1, 1), (2, 3), (3, 2), (4, 4), (5, 3)])
def test_hard_assignment_is_optimal_vs_brute_force(p, g):
    rng = np.random.default_rng(p * 10 + g)
    for _ in range(5):
        sim = rng.choice([0.0, 0.25, 0.5, 2 / 3, 1.0], size=(p, g))
        r = hard_assignment(sim)
        assert r.sum() == pytest.approx(_brute_force_hard(sim))
        assert (r > 0).sum() <= min(p, g)


@pytest.mark.parametrize("p, g", [(1, 2), (3, 3), (4, 2)])
def test_sinkhorn_matches_loop_reference(p, g):
    rng = np.random.default_rng(p + 7 * g)
    sim = rng.random((p, g))
    np.testing.assert_allclose(sinkhorn_plan(sim, reg=0.5, iters=50), _loop_sinkhorn(sim, 0.5, 50), rtol=1e-9, atol=1e-12)


def test_batched_sinkhorn_equals_one_at_a_time():
    rng = np.random.default_rng(0)
    sizes = [1, 3, 2, 4]
    n = max(sizes)
    sims = torch.zeros(len(sizes), n, n, dtype=D)
    valid = torch.zeros(len(sizes), n, dtype=torch.bool)
    singles = []
    for i, m in enumerate(sizes):
        s = rng.random((m, m))
        sims[i, :m, :m] = torch.from_numpy(s)
        sims[i, m:, :] = 99.0  # padding must be ignored
        valid[i, :m] = True
        singles.append(sinkhorn_plan(s, reg=0.1, iters=100))
    plans = sinkhorn_plan_batched(sims, valid, reg=0.1, iters=100)
    for i, m in enumerate(sizes):
        np.testing.assert_allclose(plans[i, :m, :m].numpy(), singles[i], rtol=1e-9, atol=1e-12)
        assert plans[i, m:, :].abs().sum() == 0 and plans[i, :, m:].abs().sum() == 0


# --------------------------------------------------------------------------- invariances of the assignment


def test_sinkhorn_marginals_and_limit_to_hard():
    sim = np.array([[0.9, 0.8, 0.1], [0.85, 0.1, 0.3]])
    plan = sinkhorn_plan(sim, reg=0.1)
    np.testing.assert_allclose(plan.sum(axis=1), [1.0, 1.0], atol=1e-8)
    assert (plan.sum(axis=0) <= 1.0 + 1e-8).all()
    np.testing.assert_allclose(soft_assignment(sim, reg=0.005, iters=2000), hard_assignment(sim), atol=1e-3)
    soft = soft_assignment(sim, reg=0.1)
    assert (soft <= sim.max(axis=1) + 1e-12).all() and (soft >= 0).all()


def test_permuting_gold_calls_changes_nothing():
    preds = [call("f", a=1), call("g", b=2), call("f", a=3, c=1)]
    golds = [call("f", a=1), call("f", a=3), call("g", b=2)]
    base_hard = hard_assignment(similarity_matrix(preds, golds))
    base_soft = soft_assignment(similarity_matrix(preds, golds))
    for perm in itertools.permutations(golds):
        np.testing.assert_allclose(hard_assignment(similarity_matrix(preds, list(perm))), base_hard)
        np.testing.assert_allclose(soft_assignment(similarity_matrix(preds, list(perm))), base_soft, atol=1e-9)


# --------------------------------------------------------------------------- advantage


def _inputs(turn_rewards, outcome, group_ids, tokens_per_turn=2) -> AdvantageInputs:
    tr = torch.tensor(turn_rewards, dtype=D)
    bsz, k = tr.shape
    token_turn = torch.arange(k).repeat_interleave(tokens_per_turn).expand(bsz, -1).clone()
    return AdvantageInputs(
        action_mask=torch.ones(bsz, k * tokens_per_turn, dtype=torch.bool),
        token_turn=token_turn,
        turn_rewards=tr,
        turn_mask=torch.ones(bsz, k, dtype=torch.bool),
        state_keys=torch.full((bsz, k), -1),
        group_ids=torch.tensor(group_ids),
        outcome=torch.tensor(outcome, dtype=D),
        first_tool_turn=torch.full((bsz,), k),
    )


def test_advantage_by_hand():
    # returns (gamma 0.9): [1 + 0.9*0, 0] = [1, 0] and [0 + 0.9*1, 1] = [0.9, 1];
    # z-score per turn index over the pair: turn 0 -> [+s, -s], turn 1 -> [-s, +s],
    # s = 1/sqrt(2); A_traj = [+s, -s]; A = 0.5 A_traj + 0.5 A_turn.
    inp = _inputs([[1.0, 0.0], [0.0, 1.0]], [1.0, 0.0], [0, 0])
    adv = ESTIMATORS.get("matchtir")(inp, MatchTIREstimatorConfig()).advantages
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(adv, torch.tensor([[s, s, 0, 0], [-s, -s, 0, 0]], dtype=D), atol=1e-5, rtol=0)


def _loop_matchtir(inp: AdvantageInputs, mc: MatchTIRConfig, eps: float):
    d = ref._lists(inp)
    rewards = inp.extra.get("matchtir_turn_rewards", inp.turn_rewards).tolist()
    has_gold = inp.extra.get("has_gold", torch.ones(len(rewards), dtype=torch.bool)).tolist()
    groups = defaultdict(list)
    for i, g in enumerate(d["group_ids"]):
        groups[g].append(i)
    a_traj = {}
    for members in groups.values():
        xs = [d["outcome"][i] for i in members]
        for i in members:
            a_traj[i] = ref._normalise(d["outcome"][i], xs, True, eps)
    k = len(rewards[0])
    rets = []
    for i, row in enumerate(rewards):
        valid = [d["turn_mask"][i][j] and has_gold[i] for j in range(k)]
        out, run = [0.0] * k, 0.0
        for j in reversed(range(k)):
            if valid[j]:
                run = row[j] + mc.gamma * run
                out[j] = run
        rets.append((out, valid))
    per_turn = []
    for i in range(len(rewards)):
        row = []
        for j in range(k):
            if not has_gold[i]:
                row.append((mc.traj_weight + mc.turn_weight) * a_traj[i])
                continue
            cell = [rets[m][0][j] for m in groups[d["group_ids"][i]] if rets[m][1][j]]
            a_turn = ref._normalise(rets[i][0][j], cell, True, eps) if rets[i][1][j] else 0.0
            row.append(mc.traj_weight * a_traj[i] + mc.turn_weight * a_turn)
        per_turn.append(row)
    return ref._tokens_from_turns(d, per_turn)


@pytest.mark.parametrize("shape", [(4, 8, 2, 2), (9, 14, 3, 3), (16, 20, 4, 4)], ids=str)
def test_matches_loop_reference(shape):
    mc = MatchTIRConfig(gamma=0.8, traj_weight=0.3, turn_weight=0.7)
    for seed in range(2):
        inp = ref.random_inputs(seed, *shape)
        g = torch.Generator().manual_seed(seed)
        extra = {
            "matchtir_turn_rewards": torch.rand(inp.turn_rewards.shape, generator=g, dtype=D).round(decimals=1),
            "has_gold": torch.rand(shape[0], generator=g) > 0.25,
        }
        inp = replace(inp, extra=extra)
        for cfg in (MatchTIREstimatorConfig(matchtir=mc), EstimatorConfig(estimator="matchtir")):
            used = getattr(cfg, "matchtir", MatchTIRConfig())
            out = ESTIMATORS.get("matchtir")(inp, cfg).advantages
            torch.testing.assert_close(out, torch.tensor(_loop_matchtir(inp, used, cfg.eps), dtype=D), atol=1e-9, rtol=1e-7)


def test_no_gold_trajectory_gets_traj_advantage_and_leaves_others_alone():
    inp = _inputs([[1.0, 0.0], [0.0, 1.0], [0.3, 0.3]], [1.0, 0.0, 0.5], [0, 0, 0])
    base = ESTIMATORS.get("matchtir")(replace(inp, extra={"has_gold": torch.tensor([True, True, False])}), MatchTIREstimatorConfig())
    # the third trajectory's turn rewards are never read
    noisy = replace(
        inp,
        extra={
            "has_gold": torch.tensor([True, True, False]),
            "matchtir_turn_rewards": torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, -9.0]], dtype=D),
        },
    )
    out = ESTIMATORS.get("matchtir")(noisy, MatchTIREstimatorConfig()).advantages
    torch.testing.assert_close(out, base.advantages)
    a_traj = (torch.tensor([1.0, 0.0, 0.5], dtype=D) - 0.5) / (0.5 + 1e-6)
    torch.testing.assert_close(out[2], a_traj[2].expand(4))


def test_errors_name_the_problem():
    inp = _inputs([[1.0, 0.0], [0.0, 1.0]], [1.0, 0.0], [0, 0])
    with pytest.raises(ValueError, match=r"matchtir_turn_rewards'\] has shape \(2, 3\)"):
        ESTIMATORS.get("matchtir")(replace(inp, extra={"matchtir_turn_rewards": torch.zeros(2, 3)}), MatchTIREstimatorConfig())
    with pytest.raises(ValueError, match="assignment must be 'hard' or 'soft'"):
        MatchTIRConfig(assignment="greedy")
    with pytest.raises(ValueError, match="sinkhorn_reg must be > 0"):
        MatchTIRConfig(sinkhorn_reg=0.0)
    with pytest.raises(ValueError, match="both 0, so every advantage would be 0"):
        MatchTIRConfig(traj_weight=0.0, turn_weight=0.0)
    assert MatchTIRConfig(traj_weight=0.0, turn_weight=1.0).turn_weight == 1.0
    assert EstimatorConfig(estimator="matchtir").estimator == "matchtir"
