"""Policy losses, KL, entropy, value loss, aggregation."""

from __future__ import annotations

import math

import pytest
import torch

from mmgym.algos import AGGREGATIONS, POLICY_LOSSES, LossConfig, aggregate, entropy_from_logits, kl_penalty, value_loss
from mmgym.core import RegistryError

from . import _reference as ref

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


def test_registries_have_documented_names():
    assert POLICY_LOSSES.names() == ["gspo", "ppo_clip"]
    assert AGGREGATIONS.names() == ["seq_mean_token_mean", "seq_mean_token_sum_norm", "token_mean"]
    with pytest.raises(RegistryError, match="unknown loss aggregation 'mean'; known: seq_mean_token_mean"):
        aggregate(t([[1.0]]), torch.ones(1, 1, dtype=torch.bool), "mean")


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"clip_low": 1.0}, "clip_low must lie in"),
        ({"clip_high": -0.1}, "clip_high must be"),
        ({"dual_clip": 0.5}, "dual_clip must be > 1"),
        ({"kl_kind": "k4"}, "kl_kind"),
        ({"agg_mode": "sum"}, "unknown loss aggregation 'sum'"),
        ({"policy_loss": "ppo"}, "unknown policy loss 'ppo'; known: gspo, ppo_clip"),
        ({"norm_length": 0}, "norm_length"),
    ],
)
def test_config_rejects_bad_values(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        LossConfig(**kwargs)


# --------------------------------------------------------------------------- hand-worked


def test_ppo_clip_by_hand():
    ratios = t([[1.5, 0.5, 1.1, 0.7, 2.0]])
    adv = t([[1.0, 1.0, -1.0, -1.0, 3.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    old = torch.zeros_like(ratios)
    loss, m = POLICY_LOSSES.get("ppo_clip")(ratios.log(), old, adv, mask, LossConfig(clip_low=0.2, clip_high=0.28))
    # 1.5, A=+1: clipped to 1.28 -> -1.28;  0.5, A=+1: unclipped -> -0.5
    # 1.1, A=-1: inside -> 1.1;             0.7, A=-1: clipped to 0.8 -> 0.8;  masked -> 0
    torch.testing.assert_close(loss, t([[-1.28, -0.5, 1.1, 0.8, 0.0]]))
    assert m["clip_frac"].item() == pytest.approx(0.5)
    assert m["clip_frac_high"].item() == pytest.approx(0.25)
    assert m["clip_frac_low"].item() == pytest.approx(0.25)
    assert m["approx_kl"].item() == pytest.approx(-sum(math.log(x) for x in (1.5, 0.5, 1.1, 0.7)) / 4)


def test_ppo_dual_clip_by_hand():
    ratios, adv = t([[5.0, 5.0, 0.5]]), t([[-1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    cfg = LossConfig(dual_clip=3.0)
    loss, m = POLICY_LOSSES.get("ppo_clip")(ratios.log(), torch.zeros_like(ratios), adv, mask, cfg)
    # A=-1, ratio 5: PPO loss 5, capped at 3*1 = 3; A=+1: -min(5, 1.2) = -1.2; A=-2, ratio 0.5: 2*0.8 = 1.6
    torch.testing.assert_close(loss, t([[3.0, -1.2, 1.6]]))
    assert m["dual_clip_frac"].item() == pytest.approx(1 / 3)


def test_ppo_gradient_vanishes_when_clipped():
    logp = torch.log(t([[1.5, 0.9]])).requires_grad_(True)
    loss, _ = POLICY_LOSSES.get("ppo_clip")(logp, torch.zeros(1, 2, dtype=D), t([[1.0, 1.0]]),
                                            torch.ones(1, 2, dtype=torch.bool), LossConfig())
    loss.sum().backward()
    # token 0 is clipped (no gradient); token 1: d(-rho)/dlogp = -rho = -0.9
    torch.testing.assert_close(logp.grad, t([[0.0, -0.9]]))


def test_gspo_by_hand():
    logp = t([[0.2, 0.0, 5.0]]).requires_grad_(True)
    old = torch.zeros(1, 3, dtype=D)
    mask = torch.tensor([[True, True, False]])
    cfg = LossConfig(policy_loss="gspo")
    s = math.exp(0.1)  # exp(mean log-ratio over the 2 masked tokens) = 1.10517
    loss, m = POLICY_LOSSES.get("gspo")(logp, old, t([[1.0, 1.0, 1.0]]), mask, cfg)
    # A > 0 and s above 1 + 4e-4: clipped, -1.0004 on both tokens
    torch.testing.assert_close(loss, t([[-1.0004, -1.0004, 0.0]]))
    assert m["seq_ratio_mean"].item() == pytest.approx(s)
    assert m["clip_frac"].item() == 1.0
    loss, _ = POLICY_LOSSES.get("gspo")(logp, old, t([[-1.0, -1.0, -1.0]]), mask, cfg)
    torch.testing.assert_close(loss, t([[s, s, 0.0]]))
    loss.sum().backward()
    # gradient of s_{i,t} = sg[s_i] pi/sg[pi] is s_i per token, times -A = 1
    torch.testing.assert_close(logp.grad, t([[s, s, 0.0]]))


def test_kl_estimators_by_hand():
    logp, ref_logp = torch.log(t([0.5])), torch.log(t([0.25]))
    # x = log(0.25 / 0.5) = -ln 2
    assert kl_penalty(logp, ref_logp, "k1").item() == pytest.approx(math.log(2))
    assert kl_penalty(logp, ref_logp, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_penalty(logp, ref_logp, "k3").item() == pytest.approx(0.5 - 1 + math.log(2))  # 0.193147
    assert kl_penalty(logp, ref_logp, "low_var_kl").item() == pytest.approx(0.1931471805599453)
    with pytest.raises(ValueError, match="unknown KL estimator 'k9'"):
        kl_penalty(logp, ref_logp, "k9")  # type: ignore[arg-type]


def test_kl_estimators_average_to_true_kl():
    # E_{y~pi}[k1] = E[k3] = KL(pi || ref) exactly when averaged under pi's probabilities
    pi, q = t([0.7, 0.2, 0.1]), t([0.4, 0.4, 0.2])
    true_kl = (pi * (pi / q).log()).sum()
    for kind in ("k1", "k3"):
        est = (pi * kl_penalty(pi.log(), q.log(), kind)).sum()
        torch.testing.assert_close(est, true_kl)
    assert (kl_penalty(pi.log(), q.log(), "k3") >= 0).all()


def test_entropy_by_hand():
    logits = torch.log(t([[[1.0, 1.0], [1.0, 3.0]]]))
    ent = entropy_from_logits(logits)
    # ln 2; -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.562335
    torch.testing.assert_close(ent, t([[math.log(2), 0.5623351446188083]]))
    assert entropy_from_logits(torch.randn(2, 3, 5).to(torch.bfloat16)).dtype == torch.float32


def test_aggregate_by_hand():
    loss = t([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    assert aggregate(loss, mask, "token_mean").item() == pytest.approx(2.5)  # 10 / 4 tokens
    assert aggregate(loss, mask, "seq_mean_token_mean").item() == pytest.approx(3.0)  # (2 + 4) / 2 seqs
    # (6/3 + 4/3 + 0) / 3 sequences, and with the constant 4
    assert aggregate(loss, mask, "seq_mean_token_sum_norm").item() == pytest.approx(10 / 9)
    assert aggregate(loss, mask, "seq_mean_token_sum_norm", norm_length=4).item() == pytest.approx(10 / 12)
    assert aggregate(loss, torch.zeros_like(mask), "token_mean").item() == 0.0


def test_value_loss_by_hand():
    v, old, ret = t([[1.0, 0.6]]), t([[0.5, 0.5]]), t([[0.0, 1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    # (1-0)^2 vs clipped (0.7-0)^2 -> 1 -> 0.5;  0.6 inside the clip: 0.16 -> 0.08
    torch.testing.assert_close(value_loss(v, old, ret, mask, clip=0.2), t([[0.5, 0.08]]))
    torch.testing.assert_close(value_loss(v, old, ret, mask, clip=None), t([[0.5, 0.08]]))


# --------------------------------------------------------------------------- loop references


SHAPES = [(1, 1), (3, 5), (8, 17), (16, 33)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dual", [None, 3.0])
def test_ppo_clip_matches_loop(shape, dual):
    g = torch.Generator().manual_seed(sum(shape))
    logp = -torch.rand(shape, generator=g, dtype=D) * 3
    old = logp + 0.4 * torch.randn(shape, generator=g, dtype=D)
    adv = torch.randn(shape, generator=g, dtype=D)
    mask = torch.rand(shape, generator=g) > 0.3
    cfg = LossConfig(clip_low=0.2, clip_high=0.28, dual_clip=dual)
    loss, _ = POLICY_LOSSES.get("ppo_clip")(logp, old, adv, mask, cfg)
    expected = ref.ppo_clip(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, dual)
    torch.testing.assert_close(loss, t(expected))


@pytest.mark.parametrize("shape", SHAPES)
def test_gspo_matches_loop(shape):
    g = torch.Generator().manual_seed(7 + sum(shape))
    logp = -torch.rand(shape, generator=g, dtype=D)
    old = logp + 1e-3 * torch.randn(shape, generator=g, dtype=D)
    adv = torch.randn(shape[0], 1, generator=g, dtype=D).expand(shape)
    mask = torch.rand(shape, generator=g) > 0.3
    loss, _ = POLICY_LOSSES.get("gspo")(logp, old, adv, mask, LossConfig())
    expected = ref.gspo(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 3e-4, 4e-4)
    torch.testing.assert_close(loss, t(expected))


@pytest.mark.parametrize("shape", SHAPES)
def test_aggregations_match_loops(shape):
    g = torch.Generator().manual_seed(sum(shape))
    loss = torch.randn(shape, generator=g, dtype=D)
    mask = torch.rand(shape, generator=g) > 0.4
    rows = [[x for x, m in zip(lr, mr) if m] for lr, mr in zip(loss.tolist(), mask.tolist())]
    flat = [x for r in rows for x in r]
    nonempty = [r for r in rows if r]
    expect = {
        "token_mean": sum(flat) / max(len(flat), 1),
        "seq_mean_token_mean": sum(sum(r) / len(r) for r in nonempty) / max(len(nonempty), 1),
        "seq_mean_token_sum_norm": sum(sum(r) / shape[1] for r in rows) / len(rows),
    }
    for mode, value in expect.items():
        assert aggregate(loss, mask, mode).item() == pytest.approx(value), mode


# --------------------------------------------------------------------------- invariances


@pytest.mark.parametrize("name", ["ppo_clip", "gspo"])
def test_masked_tokens_do_not_matter(name):
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(4, 6, generator=g, dtype=D)
    old = logp + 0.01 * torch.randn(4, 6, generator=g, dtype=D)
    adv = torch.randn(4, 6, generator=g, dtype=D)
    mask = torch.rand(4, 6, generator=g) > 0.3
    cfg = LossConfig()
    loss, _ = POLICY_LOSSES.get(name)(logp, old, adv, mask, cfg)
    junk = ~mask * 50.0 * torch.randn(4, 6, generator=g, dtype=D)
    loss2, _ = POLICY_LOSSES.get(name)(logp + junk, old - junk, adv + junk, mask, cfg)
    torch.testing.assert_close(loss2, loss)
    assert (loss[~mask] == 0).all()


@pytest.mark.parametrize("name", ["ppo_clip", "gspo"])
def test_on_policy_loss_is_minus_advantage_with_policy_gradient(name):
    # at ratio 1 the surrogate's value is -A and its gradient is -A * grad log pi
    logp = -torch.rand(3, 4, dtype=D)
    adv = torch.randn(3, 4, dtype=D)
    mask = torch.ones(3, 4, dtype=torch.bool)
    x = logp.clone().requires_grad_(True)
    loss, m = POLICY_LOSSES.get(name)(x, logp, adv, mask, LossConfig())
    torch.testing.assert_close(loss, -adv)
    loss.sum().backward()
    torch.testing.assert_close(x.grad, -adv)
    assert m["clip_frac"].item() == 0.0


def test_losses_do_not_mutate_inputs():
    logp = -torch.rand(2, 3, dtype=D)
    old, adv, mask = logp + 0.5, torch.randn(2, 3, dtype=D), torch.ones(2, 3, dtype=torch.bool)
    copies = [x.clone() for x in (logp, old, adv, mask)]
    for name in POLICY_LOSSES.names():
        POLICY_LOSSES.get(name)(logp, old, adv, mask, LossConfig(dual_clip=2.0))
    for a, c in zip((logp, old, adv, mask), copies):
        assert torch.equal(a, c)


@pytest.mark.parametrize("name", ["ppo_clip", "gspo"])
def test_padding_with_inf_and_nan_gives_finite_loss_and_gradient(name):
    logp = t([[-0.5, -1.0, float("-inf")]]).requires_grad_(True)
    old = t([[-0.6, -1.0, float("-inf")]])
    adv = t([[1.0, -1.0, float("nan")]])
    mask = torch.tensor([[True, True, False]])
    loss, metrics = POLICY_LOSSES.get(name)(logp, old, adv, mask, LossConfig())
    total = aggregate(loss, mask, "seq_mean_token_mean")
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())
