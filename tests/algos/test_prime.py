"""PRIME: implicit process rewards, the PRM's CE loss and the RLOO-per-source advantage."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import replace

import pytest
import torch

from mmgym.algos import ESTIMATORS, AdvantageInputs, EstimatorConfig
from mmgym.algos.prime import (
    PrimeConfig,
    PrimeEstimatorConfig,
    implicit_process_rewards,
    prime_advantages,
    prime_prm_loss,
    rloo_token_rewards,
)

from . import _reference as ref

D = torch.float64


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def b(x):
    return torch.tensor(x, dtype=torch.bool)


# --------------------------------------------------------------------------- hand-worked


def test_implicit_process_rewards_by_hand():
    prm = t([[-1.0, -2.0, float("-inf")]])
    refp = t([[-1.5, -1.0, 0.0]])
    r = implicit_process_rewards(prm, refp, b([[True, True, False]]), beta=0.1)
    torch.testing.assert_close(r, t([[0.05, -0.1, 0.0]]))
    assert not r.requires_grad


def test_prm_loss_by_hand_and_gradient_only_on_mask():
    # z = beta * sum(prm - ref) = 1 * log 3 -> sigma(z) = 0.75
    prm = t([[math.log(3.0), 5.0], [math.log(3.0), 5.0]]).requires_grad_(True)
    refp = t([[0.0, -9.0], [0.0, -9.0]])
    mask = b([[True, False], [True, False]])
    loss, metrics = prime_prm_loss(prm, refp, mask, t([1.0, 0.0]), beta=1.0)
    expected = 0.5 * (-math.log(0.75) - math.log(0.25))
    assert loss.item() == pytest.approx(expected)
    assert metrics["prm_acc"].item() == pytest.approx(0.5)
    loss.backward()
    assert (prm.grad[:, 1] == 0).all() and (prm.grad[:, 0] != 0).all()
    # d/dz BCE = sigma(z) - y, chain rule beta = 1, mean over 2 rows
    torch.testing.assert_close(prm.grad[:, 0], t([(0.75 - 1.0) / 2, 0.75 / 2]))


def test_prime_advantages_by_hand():
    # One group of 2, every token generated. Process rewards r1 = [1, 3] (mean 2),
    # r2 = [0, 2] (mean 1): r' = 2 r - (2 + 1) -> [-1, 3], [-3, 1].
    # Outcome [1, 0] on the last token, RLOO -> [+1, -1]; coefs 1 and 2:
    # totals [-1, 3 + 2] and [-3, 1 - 2]; return-to-go [4, 5] and [-4, -1].
    adv = prime_advantages(
        t([[1.0, 3.0], [0.0, 2.0]]),
        t([1.0, 0.0]),
        b([[True, True], [True, True]]),
        torch.tensor([7, 7]),
        process_coef=1.0,
        outcome_coef=2.0,
        whiten=False,
    )
    torch.testing.assert_close(adv, t([[4.0, 5.0], [-4.0, -1.0]]))


def test_rloo_of_a_single_reward_is_leave_one_out():
    r = t([[0.0, 1.0], [0.0, 0.0], [0.0, 0.5]])
    mask = b([[False, True]] * 3)
    out = rloo_token_rewards(r, mask, torch.tensor([0, 0, 0]))
    torch.testing.assert_close(out[:, 1], t([1.0 - 0.25, 0.0 - 0.75, 0.5 - 0.5]))
    # a group of one gets 0
    assert rloo_token_rewards(r[:1], mask[:1], torch.tensor([0])).abs().sum() == 0


# --------------------------------------------------------------------------- loop reference


def _loop_prime(inp: AdvantageInputs, process, pc: PrimeConfig, gamma: float, whiten: bool):
    mask = inp.action_mask.tolist()
    proc = process.tolist()
    outc = inp.outcome.tolist()
    groups = defaultdict(list)
    for i, g in enumerate(inp.group_ids.tolist()):
        groups[g].append(i)
    bsz, length = len(mask), len(mask[0])
    total = [[0.0] * length for _ in range(bsz)]
    for members in groups.values():
        n = len(members)
        if n < 2:
            continue
        # process source (PRIME's masked_rloo, written per group)
        means = {}
        for i in members:
            vals = [proc[i][t_] for t_ in range(length) if mask[i][t_]]
            means[i] = sum(vals) / len(vals) if vals else 0.0
        s = sum(means.values())
        # outcome source: reward on the last generated token
        for i in members:
            for t_ in range(length):
                if mask[i][t_]:
                    total[i][t_] += pc.process_coef * (proc[i][t_] * n / (n - 1) - s / (n - 1))
            last = max((t_ for t_ in range(length) if mask[i][t_]), default=None)
            if last is not None:
                others = [outc[j] for j in members if j != i]
                total[i][last] += pc.outcome_coef * (outc[i] - sum(others) / len(others))
    adv = []
    for i in range(bsz):
        row, run = [0.0] * length, 0.0
        for t_ in reversed(range(length)):
            if mask[i][t_]:
                run = total[i][t_] + gamma * run
                row[t_] = run
        adv.append(row)
    return ref._whiten(adv, mask) if whiten else adv


def _with_process(inp: AdvantageInputs, seed: int) -> AdvantageInputs:
    g = torch.Generator().manual_seed(seed)
    proc = torch.randn(inp.action_mask.shape, generator=g, dtype=inp.outcome.dtype) * inp.action_mask
    return replace(inp, extra={"process_rewards": proc})


@pytest.mark.parametrize("shape", [(4, 6, 2, 2), (9, 12, 3, 3), (12, 16, 4, 4)], ids=str)
@pytest.mark.parametrize(
    "kw", [dict(gamma=1.0, whiten=True), dict(gamma=0.9, whiten=False)], ids=["g1_whiten", "g09_raw"]
)
def test_matches_loop_reference(shape, kw):
    pc = PrimeConfig(process_coef=3.0, outcome_coef=5.0)
    for seed in range(2):
        inp = _with_process(ref.random_inputs(seed, *shape), seed)
        cfg = PrimeEstimatorConfig(prime=pc, **kw)
        out = ESTIMATORS.get("prime")(inp, cfg).advantages
        expected = _loop_prime(inp, inp.extra["process_rewards"], pc, kw["gamma"], kw["whiten"])
        torch.testing.assert_close(out, t(expected), atol=1e-9, rtol=1e-7)


# --------------------------------------------------------------------------- invariances


def test_outcome_only_equals_rloo():
    inp = _with_process(ref.random_inputs(3, 10, 14, 3, 5), 3)
    cfg = PrimeEstimatorConfig(prime=PrimeConfig(process_coef=0.0, outcome_coef=1.0), whiten=False)
    torch.testing.assert_close(
        ESTIMATORS.get("prime")(inp, cfg).advantages,
        ESTIMATORS.get("rloo")(inp, EstimatorConfig(estimator="rloo")).advantages,
    )


def test_off_mask_values_and_permutation():
    inp = _with_process(ref.random_inputs(5, 12, 16, 3, 4), 5)
    cfg = PrimeEstimatorConfig()
    out = ESTIMATORS.get("prime")(inp, cfg).advantages
    assert (out[~inp.action_mask] == 0).all()
    noisy = inp.extra["process_rewards"] + 50.0 * (~inp.action_mask)
    out2 = ESTIMATORS.get("prime")(replace(inp, extra={"process_rewards": noisy}), cfg).advantages
    torch.testing.assert_close(out2, out)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    permuted = AdvantageInputs(
        **{
            f: (getattr(inp, f)[perm] if isinstance(getattr(inp, f), torch.Tensor) else getattr(inp, f))
            for f in AdvantageInputs.__dataclass_fields__
            if f != "extra"
        },
        extra={"process_rewards": inp.extra["process_rewards"][perm]},
    )
    torch.testing.assert_close(ESTIMATORS.get("prime")(permuted, cfg).advantages, out[perm])


def test_shifting_a_groups_rewards_changes_nothing():
    inp = _with_process(ref.random_inputs(8, 8, 12, 2, 4), 8)
    cfg = PrimeEstimatorConfig(whiten=False)
    base = ESTIMATORS.get("prime")(inp, cfg).advantages
    shifted = replace(
        inp,
        outcome=inp.outcome + 3.0,
        extra={"process_rewards": torch.where(inp.action_mask, inp.extra["process_rewards"] + 0.7, 0.0)},
    )
    torch.testing.assert_close(ESTIMATORS.get("prime")(shifted, cfg).advantages, base)


# --------------------------------------------------------------------------- config and errors


def test_registered_and_configurable_by_name():
    assert "prime" in ESTIMATORS
    assert EstimatorConfig(estimator="prime").estimator == "prime"
    assert PrimeEstimatorConfig().prime == PrimeConfig(update="before", beta=0.05, process_coef=5.0, outcome_coef=5.0)


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"update": "during"}, "update must be 'before' or 'after'"),
        ({"beta": 0.0}, "beta must be > 0"),
        ({"process_coef": 0.0, "outcome_coef": 0.0}, "no reward source"),
    ],
)
def test_config_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        PrimeConfig(**kw)


def test_missing_process_rewards_names_the_fix():
    inp = ref.random_inputs(0, 4, 6, 2, 2)
    with pytest.raises(ValueError, match=r"extra\['process_rewards'\].*implicit_process_rewards"):
        ESTIMATORS.get("prime")(inp, PrimeEstimatorConfig())
    bad = replace(inp, extra={"process_rewards": torch.zeros(4, 5, dtype=D)})
    with pytest.raises(ValueError, match=r"expected \(B, T\) = \(4, 6\)"):
        ESTIMATORS.get("prime")(bad, PrimeEstimatorConfig())
    with pytest.raises(ValueError, match="outcome_labels must be"):
        prime_prm_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.zeros(3), beta=0.05)
