"""Token weights: none, vppo, tor, delta_logp, fipo."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from mmgym.algos import TOKEN_WEIGHTS, TokenWeightConfig, TokenWeightInputs, compute_token_weights, visual_dependency
from mmgym.core import RegistryError

D = torch.float64


def b(x):
    return torch.tensor(x, dtype=torch.bool)


def t(x):
    return torch.tensor(x, dtype=D)


def run(name, inputs, **kw):
    return compute_token_weights(inputs, TokenWeightConfig(name=name, **kw))


def random_inputs(seed, bsz=6, length=9, vocab=5):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(bsz, length, generator=g) > 0.3
    mask[:, 0] = True
    lp = -torch.rand(bsz, length, generator=g, dtype=D) * 3
    return TokenWeightInputs(
        action_mask=mask,
        logprobs=lp,
        old_logprobs=lp + 0.3 * torch.randn(bsz, length, generator=g, dtype=D),
        ref_logprobs=lp + torch.randn(bsz, length, generator=g, dtype=D),
        logits_with_image=torch.randn(bsz, length, vocab, generator=g, dtype=D),
        logits_without_image=torch.randn(bsz, length, vocab, generator=g, dtype=D),
        perception_mask=torch.rand(bsz, length, generator=g) > 0.6,
        group_ids=torch.arange(bsz) // 3,
    )


def test_registry_names_and_config_errors():
    assert TOKEN_WEIGHTS.names() == ["delta_logp", "fipo", "none", "tor", "vppo"]
    with pytest.raises(ValueError, match="unknown token weighting 'vpo'; known: delta_logp, fipo, none"):
        TokenWeightConfig(name="vpo")
    with pytest.raises(RegistryError, match="unknown token weighting"):
        TOKEN_WEIGHTS.get("vpo")
    with pytest.raises(ValueError, match="vppo_top_frac"):
        TokenWeightConfig(vppo_top_frac=0.0)


# --------------------------------------------------------------------------- hand-worked


def test_none_is_the_mask():
    w, m = run("none", TokenWeightInputs(action_mask=b([[True, False, True]])))
    assert w.tolist() == [[1.0, 0.0, 1.0]] and m["extra_forwards"].item() == 0


def test_visual_dependency_by_hand():
    # p = (1/2, 1/2), q = (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    with_img = t([[[0.0, 0.0], [1.0, 2.0]]])
    without = t([[[math.log(3.0), 0.0], [1.0, 2.0]]])
    dep = visual_dependency(with_img, without)
    torch.testing.assert_close(dep, t([[0.5 * math.log(4 / 3), 0.0]]))
    # log-probabilities in, same answer
    torch.testing.assert_close(visual_dependency(with_img.log_softmax(-1), without.log_softmax(-1)), dep)


def test_visual_dependency_skips_tokens_both_distributions_forbid():
    # a sampler's forbidden token is -inf in both: 0 log 0 counts 0 (not nan); a token only
    # the masked forward forbids while the image one allows it makes the KL infinite
    ninf = -math.inf
    with_img = t([[[0.0, 0.0, ninf], [0.0, 0.0, 0.0]]])
    without = t([[[math.log(3.0), 0.0, ninf], [0.0, 0.0, ninf]]])
    dep = visual_dependency(with_img, without)
    assert dep[0, 0].item() == pytest.approx(0.5 * math.log(4 / 3)) and dep[0, 1].item() == math.inf


def _logits_with_dependency(deps):
    """(B, T, 2) pairs whose KL(with || without) increases with the given ranks."""
    with_img = torch.zeros(len(deps), len(deps[0]), 2, dtype=D)
    without = torch.tensor([[[float(x), 0.0] for x in row] for row in deps], dtype=D)
    return with_img, without


def test_vppo_by_hand():
    # two trajectories of one group, 5 generated tokens each; dependency grows with the
    # logit gap, so row 0 ranks tokens 3 > 1 > rest, row 1 is less dependent overall.
    w_img, wo_img = _logits_with_dependency([[0, 2, 0, 3, 0], [0, 0, 1, 0, 0]])
    inp = TokenWeightInputs(
        action_mask=torch.ones(2, 5, dtype=torch.bool),
        logits_with_image=w_img,
        logits_without_image=wo_img,
        group_ids=torch.tensor([0, 0]),
    )
    w, m = run("vppo", inp, vppo_top_frac=0.4, vppo_min_scale=0.9, vppo_max_scale=1.0)
    # ceil(0.4 * 5) = 2 tokens kept per row; row 1 ties at 0 broken by position (token 0)
    torch.testing.assert_close(w, t([[0, 1.0, 0, 1.0, 0], [0.9, 0, 0.9, 0, 0]]))
    assert m["extra_forwards"].item() == 1.0 and m["kept_frac"].item() == pytest.approx(0.4)


def test_tor_by_hand():
    inp = TokenWeightInputs(action_mask=b([[True, True, True, False]]), perception_mask=b([[True, False, False, True]]))
    w, _ = run("tor", inp, tor_perception_weight=2.0, tor_reasoning_weight=1.0)
    torch.testing.assert_close(w, torch.tensor([[1.5, 0.75, 0.75, 0.0]]))
    w, m = run("tor", inp, tor_perception_weight=2.0, tor_reasoning_weight=1.0, tor_normalize=False)
    torch.testing.assert_close(w, torch.tensor([[2.0, 1.0, 1.0, 0.0]]))
    assert m["perception_frac"].item() == pytest.approx(1 / 3)


def test_delta_logp_by_hand():
    lp = t([[0.0, 0.0, 0.0, 0.0, 0.0]])
    refp = t([[0.0, -math.log(2.0), math.log(2.0), -5.0, 9.0]])
    inp = TokenWeightInputs(action_mask=b([[True, True, True, True, False]]), logprobs=lp, ref_logprobs=refp)
    w, _ = run("delta_logp", inp, delta_alpha=1.0, delta_min=0.5, delta_max=2.0)
    torch.testing.assert_close(w, t([[1.0, 2.0, 0.5, 2.0, 0.0]]))


def test_fipo_by_hand_with_env_tokens_skipped():
    # decay_rate 1 -> gamma 1/2; deltas on generated tokens [0.1, 0, 0.2] with an env
    # token in between: FutureKL = [0.1 + 0 + 0.05, 0 + 0.1, 0.2]
    old = t([[0.0, 0.0, 0.0, 0.0]])
    lp = t([[0.1, 5.0, 0.0, 0.2]])
    inp = TokenWeightInputs(action_mask=b([[True, False, True, True]]), logprobs=lp, old_logprobs=old)
    w, _ = run("fipo", inp, fipo_decay_rate=1.0, fipo_clip=0.2)
    torch.testing.assert_close(w, t([[math.exp(0.15), 0.0, math.exp(0.1), 1.2]]))
    w, _ = run("fipo", replace(inp, logprobs=-lp), fipo_decay_rate=1.0, fipo_clip=0.2, fipo_clip_high_only=False)
    torch.testing.assert_close(w, t([[math.exp(-0.15), 0.0, math.exp(-0.1), math.exp(-0.2)]]))


# --------------------------------------------------------------------------- loop references


def _loop_vppo(inp: TokenWeightInputs, cfg: TokenWeightConfig):
    mask = inp.action_mask.tolist()
    p = inp.logits_with_image.softmax(-1).tolist()
    q = inp.logits_without_image.softmax(-1).tolist()
    bsz, length = len(mask), len(mask[0])
    dep = [[sum(pi * math.log(pi / qi) for pi, qi in zip(p[i][t_], q[i][t_])) if mask[i][t_] else 0.0 for t_ in range(length)] for i in range(bsz)]
    mean = [sum(dep[i]) / max(sum(mask[i]), 1) for i in range(bsz)]
    gid = inp.group_ids.tolist()
    out = []
    for i in range(bsz):
        peers = [mean[j] for j in range(bsz) if gid[j] == gid[i] and sum(mask[j])]
        lo, hi = min(peers), max(peers)
        frac = 1.0 if hi == lo else (mean[i] - lo) / (hi - lo)
        alpha = cfg.vppo_min_scale + (cfg.vppo_max_scale - cfg.vppo_min_scale) * frac
        idx = [t_ for t_ in range(length) if mask[i][t_]]
        idx.sort(key=lambda t_: -dep[i][t_])  # stable: earlier position first on ties
        keep = set(idx[: math.ceil(len(idx) * cfg.vppo_top_frac)])
        out.append([alpha if t_ in keep else 0.0 for t_ in range(length)])
    return out


def _loop_fipo(inp: TokenWeightInputs, cfg: TokenWeightConfig):
    mask = inp.action_mask.tolist()
    delta = (inp.logprobs - inp.old_logprobs).tolist()
    gamma = 2.0 ** (-1.0 / cfg.fipo_decay_rate)
    low = 1.0 if cfg.fipo_clip_high_only else 1.0 - cfg.fipo_clip
    out = []
    for i, row in enumerate(mask):
        ws = [0.0] * len(row)
        for t_ in range(len(row)):
            if not row[t_]:
                continue
            fut, k = 0.0, 0
            for s in range(t_, len(row)):
                if row[s]:
                    fut += gamma**k * delta[i][s]
                    k += 1
            ws[t_] = min(max(math.exp(fut), low), 1.0 + cfg.fipo_clip)
        out.append(ws)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_vppo_and_fipo_match_loop_references(seed):
    inp = random_inputs(seed)
    for cfg in (TokenWeightConfig(name="vppo"), TokenWeightConfig(name="vppo", vppo_top_frac=0.7, vppo_min_scale=0.5)):
        torch.testing.assert_close(compute_token_weights(inp, cfg)[0], t(_loop_vppo(inp, cfg)))
    for cfg in (TokenWeightConfig(name="fipo", fipo_decay_rate=4.0), TokenWeightConfig(name="fipo", fipo_clip_high_only=False)):
        torch.testing.assert_close(compute_token_weights(inp, cfg)[0], t(_loop_fipo(inp, cfg)))


# --------------------------------------------------------------------------- invariances


@pytest.mark.parametrize("name", ["none", "vppo", "tor", "delta_logp", "fipo"])
def test_zero_off_mask_and_off_mask_values_ignored(name):
    inp = random_inputs(7)
    w, metrics = compute_token_weights(inp, TokenWeightConfig(name=name))
    assert (w[~inp.action_mask] == 0).all() and torch.isfinite(w).all() and not w.requires_grad
    off = ~inp.action_mask
    noisy = replace(
        inp,
        logprobs=torch.where(off, -torch.inf, inp.logprobs),
        old_logprobs=torch.where(off, 7.0, inp.old_logprobs),
        ref_logprobs=torch.where(off, -99.0, inp.ref_logprobs),
        logits_without_image=torch.where(off.unsqueeze(-1), 50.0, inp.logits_without_image),
    )
    torch.testing.assert_close(compute_token_weights(noisy, TokenWeightConfig(name=name))[0], w)
    assert metrics["extra_forwards"].item() == (1.0 if name == "vppo" else 0.0)


def test_unchanged_policy_gives_unit_weights():
    inp = random_inputs(1)
    same = replace(inp, old_logprobs=inp.logprobs, ref_logprobs=inp.logprobs, logits_without_image=inp.logits_with_image)
    for name in ("fipo", "delta_logp"):
        w, _ = compute_token_weights(same, TokenWeightConfig(name=name))
        torch.testing.assert_close(w, inp.action_mask.to(D))
    # vppo with no visual dependency anywhere: every trajectory at full scale, ties by position
    w, _ = compute_token_weights(same, TokenWeightConfig(name="vppo"))
    assert set(w[inp.action_mask].unique().tolist()) <= {0.0, 1.0}


def test_permuting_rows_permutes_weights():
    inp = random_inputs(3)
    perm = torch.tensor([3, 4, 5, 0, 1, 2])  # keeps groups whole
    permuted = TokenWeightInputs(**{f: getattr(inp, f)[perm] for f in TokenWeightInputs.__dataclass_fields__})
    for name in TOKEN_WEIGHTS.names():
        cfg = TokenWeightConfig(name=name)
        torch.testing.assert_close(compute_token_weights(permuted, cfg)[0], compute_token_weights(inp, cfg)[0][perm])


def test_missing_inputs_name_the_field():
    inp = TokenWeightInputs(action_mask=b([[True]]))
    for name, field in [("vppo", "logits_with_image"), ("tor", "perception_mask"), ("delta_logp", "logprobs"), ("fipo", "logprobs")]:
        with pytest.raises(ValueError, match=f"'{name}' needs TokenWeightInputs.{field}"):
            run(name, inp)
    with pytest.raises(ValueError, match=r"ref_logprobs has shape \(1, 2\), expected \(B, T\) = \(1, 1\)"):
        TokenWeightInputs(action_mask=b([[True]]), ref_logprobs=torch.zeros(1, 2))
