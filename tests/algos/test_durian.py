"""Durian: difficulty bins and GRPO with a std shared within each difficulty bin."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import replace

import numpy as np
import pytest
import torch

from mmgym.algos import ESTIMATORS, AdvantageInputs, EstimatorConfig
from mmgym.algos.durian import (
    DurianConfig,
    DurianEstimatorConfig,
    combine_difficulty,
    difficulty_bins,
    durian_normalize,
    visual_entropy,
)

from . import _reference as ref

D = torch.float64


def single(outcome, groups, difficulty, t_len=2) -> AdvantageInputs:
    inp = AdvantageInputs.single_turn(
        torch.tensor(outcome, dtype=D), torch.tensor(groups), torch.ones(len(outcome), t_len, dtype=torch.bool)
    )
    return replace(inp, extra={"difficulty": torch.tensor(difficulty, dtype=D)})


# --------------------------------------------------------------------------- hand-worked


def test_pooled_std_by_hand():
    # groups [1, 0] and [1, 1, 0, 0] share one bin: centred +-0.5 everywhere,
    # pooled var = 6 * 0.25 / ((2 - 1) + (4 - 1)) = 0.375
    inp = single([1, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1.0] * 6)
    adv = ESTIMATORS.get("durian_grpo")(inp, DurianEstimatorConfig(durian=DurianConfig(num_bins=1))).advantages
    a = 0.5 / (math.sqrt(0.375) + 1e-6)
    torch.testing.assert_close(adv[:, 0], torch.tensor([a, -a, a, a, -a, -a], dtype=D))


def test_total_std_by_hand():
    # bin rewards [1, 0, 1, 1, 0, 0] -> unbiased std sqrt(1.5 / 5)
    inp = single([1, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1.0] * 6)
    cfg = DurianEstimatorConfig(durian=DurianConfig(num_bins=1, std_mode="total"))
    adv = ESTIMATORS.get("durian_grpo")(inp, cfg).advantages
    assert adv[0, 0].item() == pytest.approx(0.5 / math.sqrt(0.3), rel=1e-5)


def test_bins_by_hand():
    gid = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    # group means 0.5, 2, 2, 10 (a group never splits even with unequal member scores)
    d = torch.tensor([0.0, 1.0, 2.0, 2.0, 1.0, 3.0, 10.0, 10.0])
    assert difficulty_bins(d, gid, num_bins=2, binning="quantile").tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    assert difficulty_bins(d, gid, num_bins=2, binning="uniform").tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    assert difficulty_bins(d, gid, edges=(1.0, 5.0)).tolist() == [0, 0, 1, 1, 1, 1, 2, 2]
    assert difficulty_bins(d, gid, num_bins=1).tolist() == [0] * 8


def test_visual_entropy_and_combination():
    assert visual_entropy(np.full((8, 8, 3), 128, np.uint8)) == 0.0
    half = np.zeros((8, 8), np.uint8)
    half[:, 4:] = 255
    assert visual_entropy(half) == pytest.approx(1.0)
    assert visual_entropy(np.random.default_rng(0).random((32, 32))) > 7.0
    d = combine_difficulty(torch.tensor([1.0, 1.0, 3.0]), torch.tensor([0.9, 0.1, 0.5]))
    assert d[1] > d[0] and d[2] > d[0]  # lower confidence, or busier image, is harder


# --------------------------------------------------------------------------- loop reference


def _loop_durian(outcome, groups, difficulty, dc: DurianConfig, eps: float):
    by_group = defaultdict(list)
    for i, g in enumerate(groups):
        by_group[g].append(i)
    gmean_d = {g: sum(difficulty[i] for i in m) / len(m) for g, m in by_group.items()}
    vals = sorted(gmean_d.values())
    if dc.edges is not None:
        inner = list(dc.edges)
    elif dc.num_bins == 1:
        inner = []
    elif dc.binning == "quantile":
        inner = [float(np.quantile(np.array(list(gmean_d.values())), q / dc.num_bins)) for q in range(1, dc.num_bins)]
    else:
        lo, hi = vals[0], vals[-1]
        inner = [lo + (hi - lo) * q / dc.num_bins for q in range(1, dc.num_bins)]
    gbin = {g: sum(1 for e in inner if v > e) for g, v in gmean_d.items()}
    gmean_r = {g: sum(outcome[i] for i in m) / len(m) for g, m in by_group.items()}
    sds = {}
    for bn in set(gbin.values()):
        gs = [g for g in by_group if gbin[g] == bn]
        members = [i for g in gs for i in by_group[g]]
        if dc.std_mode == "pooled":
            sq = sum((outcome[i] - gmean_r[groups[i]]) ** 2 for i in members)
            dof = sum(len(by_group[g]) - 1 for g in gs)
            sds[bn] = math.sqrt(sq / max(dof, 1))
        else:
            m = sum(outcome[i] for i in members) / len(members)
            sds[bn] = math.sqrt(sum((outcome[i] - m) ** 2 for i in members) / max(len(members) - 1, 1))
    out = []
    for i, g in enumerate(groups):
        xs = [outcome[j] for j in by_group[g]]
        centred = 0.0 if max(xs) == min(xs) else outcome[i] - gmean_r[g]
        out.append(centred / (sds[gbin[g]] + eps))
    return out


CONFIGS = [
    DurianConfig(),
    DurianConfig(num_bins=3, binning="uniform"),
    DurianConfig(num_bins=2, std_mode="total"),
    DurianConfig(edges=(-0.5, 0.0, 0.7)),
]


@pytest.mark.parametrize("dc", CONFIGS, ids=range(len(CONFIGS)))
@pytest.mark.parametrize("shape", [(4, 6, 2, 2), (12, 10, 3, 3), (24, 12, 2, 4)], ids=str)
def test_matches_loop_reference(dc, shape):
    for seed in range(2):
        inp = ref.random_inputs(seed, *shape)
        g = torch.Generator().manual_seed(seed)
        diff = torch.randn(shape[0], generator=g, dtype=D).round(decimals=1)
        inp = replace(inp, extra={"difficulty": diff})
        out = ESTIMATORS.get("durian_grpo")(inp, DurianEstimatorConfig(durian=dc)).advantages
        per_seq = _loop_durian(inp.outcome.tolist(), inp.group_ids.tolist(), diff.tolist(), dc, 1e-6)
        expected = ref._tokens_from_seq(ref._lists(inp), per_seq)
        torch.testing.assert_close(out, torch.tensor(expected, dtype=D), atol=1e-9, rtol=1e-7)


# --------------------------------------------------------------------------- invariances


def test_one_group_per_bin_is_grpo():
    inp = ref.random_inputs(4, 12, 10, 2, 3)
    dense = torch.unique(inp.group_ids, return_inverse=True)[1].to(D)
    edges = tuple(float(x) + 0.5 for x in range(int(dense.max())))
    inp = replace(inp, extra={"difficulty": dense})
    out = ESTIMATORS.get("durian_grpo")(inp, DurianEstimatorConfig(durian=DurianConfig(edges=edges))).advantages
    torch.testing.assert_close(out, ESTIMATORS.get("grpo")(inp, EstimatorConfig()).advantages)


def test_permutation_and_equal_groups():
    inp = ref.random_inputs(9, 16, 12, 3, 4)
    diff = torch.randn(16, generator=torch.Generator().manual_seed(0), dtype=D)
    inp = replace(inp, outcome=torch.where(inp.group_ids == inp.group_ids[0], 0.3, inp.outcome), extra={"difficulty": diff})
    cfg = DurianEstimatorConfig(durian=DurianConfig(num_bins=2))
    out = ESTIMATORS.get("durian_grpo")(inp, cfg).advantages
    assert (out[inp.group_ids == inp.group_ids[0]] == 0).all()
    assert (out[~inp.action_mask] == 0).all()
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(2))
    permuted = AdvantageInputs(
        **{
            f: (getattr(inp, f)[perm] if isinstance(getattr(inp, f), torch.Tensor) else getattr(inp, f))
            for f in AdvantageInputs.__dataclass_fields__
            if f != "extra"
        },
        extra={"difficulty": diff[perm]},
    )
    torch.testing.assert_close(ESTIMATORS.get("durian_grpo")(permuted, cfg).advantages, out[perm])


def test_normalize_function_and_errors():
    a = durian_normalize(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.tensor([0, 0]))
    assert a[0].item() == pytest.approx(0.5 / (math.sqrt(0.5) + 1e-6))
    inp = single([1, 0], [0, 0], [0.0, 0.0])
    with pytest.raises(ValueError, match=r"needs inputs.extra\['difficulty'\]"):
        ESTIMATORS.get("durian_grpo")(replace(inp, extra=None), DurianEstimatorConfig())
    with pytest.raises(ValueError, match="NaN or inf"):
        difficulty_bins(torch.tensor([float("nan"), 0.0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="strictly increasing"):
        DurianConfig(edges=(1.0, 1.0))
    with pytest.raises(TypeError, match="cfg.durian must be a DurianConfig"):

        class Bad(EstimatorConfig):
            durian = "x"

        ESTIMATORS.get("durian_grpo")(inp, Bad(estimator="durian_grpo"))
