"""Advantage estimators: hand-worked cases, loop references, invariances."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from mmgym.algos import ESTIMATORS, AdvantageInputs, AdvantageOutput, EstimatorConfig, compute_advantages
from mmgym.algos.advantages import (
    compute_answer_logprobs,
    discounted_returns,
    gae_advantages,
    group_normalize,
    information_gain_rewards,
    masked_whiten,
)
from mmgym.core import RegistryError

from . import _reference as ref

ALL = [
    "grpo",
    "dr_grpo",
    "rloo",
    "reinforce_pp",
    "reinforce_pp_baseline",
    "gae",
    "gigpo",
    "bilevel_gae",
    "mt_grpo",
    "igpo",
]
D = torch.float64


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def b(x):
    return torch.tensor(x, dtype=torch.bool)


def L(x):
    return torch.tensor(x, dtype=torch.long)


def run(name: str, inputs: AdvantageInputs, **cfg) -> AdvantageOutput:
    return ESTIMATORS.get(name)(inputs, EstimatorConfig(estimator=name, **cfg))


def multi_turn(
    token_turn,
    turn_rewards,
    group_ids,
    *,
    outcome=None,
    state_keys=None,
    first_tool_turn=None,
    values=None,
) -> AdvantageInputs:
    """Inputs from a token_turn layout (-1 = env/prompt token)."""
    tt = L(token_turn)
    tr = t(turn_rewards)
    bsz, k = tr.shape
    return AdvantageInputs(
        action_mask=tt >= 0,
        token_turn=tt,
        turn_rewards=tr,
        turn_mask=torch.ones(bsz, k, dtype=torch.bool),
        state_keys=L(state_keys) if state_keys is not None else torch.full((bsz, k), -1),
        group_ids=L(group_ids),
        outcome=t(outcome) if outcome is not None else tr.sum(1),
        first_tool_turn=L(first_tool_turn) if first_tool_turn is not None else torch.full((bsz,), k),
        values=t(values) if values is not None else None,
    )


# --------------------------------------------------------------------------- registry and config


def test_registry_has_every_documented_name():
    assert ESTIMATORS.names() == sorted(ALL + ["prime", "matchtir", "durian_grpo"])


def test_unknown_estimator_lists_known_names():
    with pytest.raises(RegistryError, match="unknown advantage estimator 'grpp'; known: bilevel_gae, dr_grpo"):
        ESTIMATORS.get("grpp")
    with pytest.raises(ValueError, match="unknown advantage estimator 'grpp'"):
        EstimatorConfig(estimator="grpp")


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"eps": 0.0}, "eps must be > 0"),
        ({"gamma": 1.5}, "gamma must lie in"),
        ({"step_gamma": -0.1}, "step_gamma must lie in"),
        ({"gigpo_mode": "std"}, "gigpo_mode"),
        ({"igpo_norm": "both"}, "igpo_norm"),
    ],
)
def test_config_rejects_bad_values(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        EstimatorConfig(**kwargs)


def test_inputs_check_shapes_and_dtypes():
    good = AdvantageInputs.single_turn(t([1.0, 0.0]), L([0, 0]), b([[True, False], [True, True]]))
    with pytest.raises(ValueError, match=r"group_ids has shape \(3,\), expected \(2,\)"):
        replace(good, group_ids=L([0, 0, 1]))
    with pytest.raises(ValueError, match="action_mask must be a bool tensor"):
        replace(good, action_mask=good.action_mask.long())


def test_critic_estimators_need_values():
    inputs = AdvantageInputs.single_turn(t([1.0, 0.0]), L([0, 0]), b([[True], [True]]))
    for name in ("gae", "bilevel_gae"):
        with pytest.raises(ValueError, match=f"{name}.*needs critic values"):
            run(name, inputs)


def test_compute_advantages_dispatches_on_config_name():
    inputs = AdvantageInputs.single_turn(t([1.0, 0.0]), L([0, 0]), b([[True], [True]]))
    out = compute_advantages(inputs, EstimatorConfig(estimator="dr_grpo"))
    assert out.advantages.tolist() == [[0.5], [-0.5]] and out.returns is None


def test_from_batch_takes_rollout_fields():
    from mmgym.core import RolloutBatch

    bsz, length, k = 2, 3, 2
    batch = RolloutBatch(
        input_ids=torch.zeros(bsz, length, dtype=torch.long),
        attention_mask=torch.ones(bsz, length, dtype=torch.bool),
        action_mask=b([[False, True, True], [False, True, False]]),
        old_logprobs=torch.zeros(bsz, length),
        token_turn=L([[-1, 0, 1], [-1, 0, -1]]),
        turn_rewards=torch.tensor([[0.0, 1.0], [0.0, 0.0]]),
        turn_mask=b([[True, True], [True, False]]),
        state_keys=L([[0, 1], [0, -1]]),
        group_ids=L([3, 3]),
        outcome=torch.tensor([1.0, 0.0]),
        success=b([True, False]),
        first_tool_turn=L([0, 2]),
        values=torch.zeros(bsz, length),
    )
    inputs = AdvantageInputs.from_batch(batch)
    assert inputs.values is batch.values and inputs.token_turn is batch.token_turn
    out = run("gigpo", inputs)
    assert out.advantages.shape == (bsz, length)


# --------------------------------------------------------------------------- hand-worked cases


def test_grpo_by_hand():
    # group 7: rewards 1,0,0,1 -> mean 0.5, unbiased std sqrt(1/3); group 8: equal; group 9: alone
    inputs = AdvantageInputs.single_turn(
        t([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 5.0]),
        L([7, 7, 7, 7, 8, 8, 9]),
        b([[False, True, True]] * 7),
    )
    adv = run("grpo", inputs).advantages
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)  # 0.8660239
    expected = [[0.0, x, x] for x in (a, -a, -a, a, 0.0, 0.0, 0.0)]
    torch.testing.assert_close(adv, t(expected))
    assert abs(a - 0.8660239) < 1e-7


def test_dr_grpo_and_rloo_by_hand():
    inputs = AdvantageInputs.single_turn(t([1.0, 0.0, 0.0, 1.0, 3.0, 1.0]), L([0, 0, 0, 0, 1, 1]), b([[True]] * 6))
    dr = run("dr_grpo", inputs).advantages[:, 0]
    torch.testing.assert_close(dr, t([0.5, -0.5, -0.5, 0.5, 1.0, -1.0]))
    lo = run("rloo", inputs).advantages[:, 0]
    # r_i - mean of the other three: 1 - 1/3, 0 - 2/3; group of two: 3 - 1, 1 - 3
    torch.testing.assert_close(lo, t([2 / 3, -2 / 3, -2 / 3, 2 / 3, 2.0, -2.0]))


def test_reinforce_pp_by_hand():
    # one turn, reward 1 at the last generated token; env token at position 1 is skipped
    inputs = AdvantageInputs.single_turn(t([1.0]), L([0]), b([[True, False, True]]))
    adv = run("reinforce_pp", inputs, gamma=0.5, whiten=False).advantages
    torch.testing.assert_close(adv, t([[0.5, 0.0, 1.0]]))
    # whitening: returns 1, 2, 3 -> mean 2, unbiased std 1 -> -1, 0, 1
    w = masked_whiten(t([[1.0, 9.0, 2.0, 3.0]]), b([[True, False, True, True]]))
    torch.testing.assert_close(w, t([[-1.0, 0.0, 0.0, 1.0]]), atol=1e-7, rtol=0)


def test_reinforce_pp_baseline_by_hand():
    inputs = AdvantageInputs.single_turn(t([1.0, 0.0]), L([0, 0]), b([[True, True], [True, False]]))
    raw = run("reinforce_pp_baseline", inputs, whiten=False).advantages
    torch.testing.assert_close(raw, t([[0.5, 0.5], [-0.5, 0.0]]))
    # whitened over the 3 masked tokens (0.5, 0.5, -0.5): mean 1/6, std sqrt(1/3)
    white = run("reinforce_pp_baseline", inputs).advantages
    torch.testing.assert_close(white, t([[0.57735, 0.57735], [-1.1547, 0.0]]), atol=1e-5, rtol=0)


def test_gae_by_hand():
    # turn 0 = tokens 0,1 (reward 0.5 at token 1), env token 2 (value 9 is never read),
    # turn 1 = token 3 (reward 1.0); gamma 0.9, lam 0.8 -> gamma*lam = 0.72
    inputs = multi_turn([[0, 0, -1, 1]], [[0.5, 1.0]], [0], values=[[0.5, 0.2, 9.0, 0.4]])
    out = run("gae", inputs, gamma=0.9, lam=0.8, whiten=False)
    # t3: 1 - 0.4 = 0.6
    # t1: 0.5 + 0.9*0.4 - 0.2 = 0.66; + 0.72*0.6 = 1.092
    # t0: 0 + 0.9*0.2 - 0.5 = -0.32; + 0.72*1.092 = 0.46624
    torch.testing.assert_close(out.advantages, t([[0.46624, 1.092, 0.0, 0.6]]))
    torch.testing.assert_close(out.returns, t([[0.96624, 1.292, 0.0, 1.0]]))


def test_gigpo_by_hand():
    # One group, two episodes of two turns, one token per turn. Anchor 10 is shared by the
    # first turns; anchors 11 and 12 are alone. step_gamma 0.5.
    inputs = multi_turn(
        [[0, 1], [0, 1]],
        [[0.0, 1.0], [0.0, 0.0]],
        [0, 0],
        state_keys=[[10, 11], [10, 12]],
    )
    # A_ep = +-0.5 (mean_norm). Step returns: A: 0.5, 1.0; B: 0, 0.
    # Step group {10}: 0.5 and 0 -> +-0.25; singletons -> 0.
    adv = run("gigpo", inputs, step_gamma=0.5).advantages
    torch.testing.assert_close(adv, t([[0.75, 0.5], [-0.75, -0.5]]))
    # mean_std_norm: both levels become +-0.7071 (two values, unbiased std = |diff|/sqrt 2)
    adv = run("gigpo", inputs, step_gamma=0.5, gigpo_mode="mean_std_norm").advantages
    torch.testing.assert_close(adv, t([[1.41421, 0.70711], [-1.41421, -0.70711]]), atol=2e-5, rtol=0)
    # w scales the step part only
    adv = run("gigpo", inputs, step_gamma=0.5, gigpo_weight=2.0).advantages
    torch.testing.assert_close(adv, t([[1.0, 0.5], [-1.0, -0.5]]))


def test_bilevel_gae_by_hand():
    # turn 0 = tokens 0,1 (end 1, V 0.3, reward 0.2); env token 2; turn 1 = tokens 3,4
    # (end 4, V 0.5, reward 1.0). gamma_turn 0.5, lam_turn 1, gamma_token 1, lam 1.
    inputs = multi_turn([[0, 0, -1, 1, 1]], [[0.2, 1.0]], [0], values=[[0.1, 0.3, 7.0, 0.2, 0.5]])
    out = run("bilevel_gae", inputs, gamma_turn=0.5, lam_turn=1.0, gamma_token=1.0, lam=1.0, whiten=False)
    # turn level: A_1 = 1 - 0.5 = 0.5; A_0 = 0.2 + 0.5*0.5 - 0.3 + 0.5*0.5 = 0.4
    # targets: 0.4 + 0.3 = 0.7 at token 1, 0.5 + 0.5 = 1.0 at token 4
    # token level: t4: 1.0 - 0.5 = 0.5; t3: 0.5 - 0.2 + 0.5 = 0.8;
    #              t1 (restart): 0.7 - 0.3 = 0.4; t0: 0.3 - 0.1 + 0.4 = 0.6
    torch.testing.assert_close(out.advantages, t([[0.6, 0.4, 0.0, 0.8, 0.5]]))
    torch.testing.assert_close(out.returns, t([[0.7, 0.7, 0.0, 1.0, 1.0]]))
    # turn_values replace V(e_k) at the turn level only
    tv = replace(inputs, turn_values=t([[0.3, 0.0]]))
    out = run("bilevel_gae", tv, gamma_turn=0.5, whiten=False)
    # A_1 = 1 - 0 = 1.0; A_0 = 0.2 + 0.5*0 - 0.3 + 0.5*1 = 0.4; targets 0.7, 1.0 (unchanged
    # by chance at turn 0); token t4: 1.0 - 0.5 = 0.5
    torch.testing.assert_close(out.advantages[0, 4], t(0.5))


def test_mt_grpo_by_hand():
    # group 0: A used the tool at turn 0 (turn reward 1) and succeeded; B did neither.
    # group 1: no tool calls (first_tool_turn = K = 2): every turn is "before the tool result".
    inputs = multi_turn(
        [[0, 1], [0, 1], [0, 1], [0, 1]],
        [[1.0, 1.0], [0.0, 0.0], [0.5, 1.0], [0.0, 0.0]],
        [0, 0, 1, 1],
        outcome=[1.0, 0.0, 1.0, 0.0],
        first_tool_turn=[0, 0, 2, 2],
    )
    # R_T: 1, 0 | 0.5, 0 (the last turn's reward is the outcome's) -> A_T = +-0.7071
    # A_O = +-0.7071; lambda 0.5: early turns A_O + 0.5 A_T = +-1.06066
    adv = run("mt_grpo", inputs, mt_lambda=0.5, mt_outcome="total").advantages
    expected = [[1.06066, 0.70711], [-1.06066, -0.70711], [1.06066, 1.06066], [-1.06066, -1.06066]]
    torch.testing.assert_close(adv, t(expected), atol=2e-5, rtol=0)


def test_mt_grpo_outcome_leaves_out_the_tool_turn_reward():
    # One group of three 2-turn episodes, zoom (turn 0, reward 0.5 on a hit) then answer
    # (turn 1, reward 1 if right); outcome = episode return:
    #   A: hit, wrong answer  -> 0.5    B: miss, right guess -> 1.0    C: miss, wrong -> 0.0
    inputs = multi_turn(
        [[0, 1], [0, 1], [0, 1]],
        [[0.5, 0.0], [0.0, 1.0], [0.0, 0.0]],
        [0, 0, 0],
        outcome=[0.5, 1.0, 0.0],
        first_tool_turn=[0, 0, 0],
    )
    # R_T = 0.5, 0, 0: mean 1/6, unbiased std 0.288675 -> A_T = 1.1547, -0.57735, -0.57735.
    # "final": R_O = outcome - R_T = 0, 1, 0 -> A_O = -0.57735, 1.1547, -0.57735, so A's wrong
    # answer is pushed down; lambda 1 on turn 0.
    adv = run("mt_grpo", inputs, mt_lambda=1.0).advantages
    expected = [[0.57735, -0.57735], [0.57735, 1.1547], [-1.1547, -0.57735]]
    torch.testing.assert_close(adv, t(expected), atol=2e-5, rtol=0)
    # "total": R_O = 0.5, 1, 0 -> A_O = 0, 1, -1: A's wrong answer gets no push down at all
    adv = run("mt_grpo", inputs, mt_lambda=1.0, mt_outcome="total").advantages
    expected = [[1.1547, 0.0], [0.42265, 1.0], [-1.57735, -1.0]]
    torch.testing.assert_close(adv, t(expected), atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="mt_outcome"):
        EstimatorConfig(mt_outcome="sum")


def test_information_gain_rewards_by_hand():
    means = torch.log(t([[0.1, 0.3, 0.6], [0.2, 0.5, 0.0]]))
    mask = b([[True, True], [True, False]])
    gains = information_gain_rewards(means, mask)
    torch.testing.assert_close(gains, t([[0.2, 0.3], [0.3, 0.0]]))
    final = information_gain_rewards(means, mask, final_reward=t([1.0, 0.25]))
    torch.testing.assert_close(final, t([[0.2, 1.0], [0.25, 0.0]]))
    with pytest.raises(ValueError, match=r"must be \(B, K\+1\)"):
        information_gain_rewards(means[:, :2], mask)


def test_igpo_by_hand():
    # group turn rewards 0.2, 1.0 | 0, 0: mean 0.3, unbiased std 0.476095
    inputs = multi_turn([[0, 1], [0, 1]], [[0.2, 1.0], [0.0, 0.0]], [4, 4])
    adv = run("igpo", inputs).advantages
    # normalised: -0.210042, 1.470291 | -0.630125 x2; then suffix sums over turns
    expected = [[1.260249, 1.470291], [-1.260249, -0.630125]]
    torch.testing.assert_close(adv, t(expected), atol=2e-6, rtol=0)


def test_compute_answer_logprobs_calls_policy_in_batches():
    calls = []

    def policy_fn(contexts, answers):
        calls.append(len(contexts))
        # log-prob of each answer token = -(number of turns seen) / 10
        return [torch.full((len(a),), -len(c) / 10) for c, a in zip(contexts, answers)]

    histories = [["q", "q t1", "q t1 t2"], ["q"]]
    histories = [[h.split() for h in row] for row in histories]
    means, mask = compute_answer_logprobs(policy_fn, histories, ["ab", "abc"], batch_size=3)
    assert calls == [3, 1]
    torch.testing.assert_close(means, torch.tensor([[-0.1, -0.2, -0.3], [-0.1, 0.0, 0.0]]))
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    rewards = information_gain_rewards(means.double(), mask[:, 1:], final_reward=t([1.0, 0.0]))
    assert rewards.shape == (2, 2)


# --------------------------------------------------------------------------- loop references


GRID = [
    # (batch, length, turns, group size)
    (1, 1, 1, 1),
    (4, 7, 2, 2),
    (6, 12, 3, 3),
    (12, 16, 4, 4),
    (9, 20, 5, 8),
]
CONFIGS = {
    "reinforce_pp": [{"gamma": 1.0}, {"gamma": 0.9, "whiten": False}],
    "reinforce_pp_baseline": [{}, {"whiten": False}],
    "gae": [{"gamma": 0.99, "lam": 0.95}, {"gamma": 1.0, "lam": 1.0, "whiten": False}],
    "gigpo": [{}, {"gigpo_mode": "mean_std_norm", "gigpo_weight": 0.5, "step_gamma": 0.9}],
    "bilevel_gae": [{}, {"gamma_turn": 0.9, "lam_turn": 0.8, "gamma_token": 0.95, "lam": 0.9, "whiten": False}],
    "mt_grpo": [{}, {"mt_lambda": 0.3}, {"mt_outcome": "total"}],
    "igpo": [{}, {"igpo_norm": "separate", "igpo_gamma": 0.9}],
}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", GRID, ids=lambda s: "x".join(map(str, s)))
def test_matches_loop_reference(name, shape):
    for seed in range(2):
        inputs = ref.random_inputs(seed, *shape)
        for kw in CONFIGS.get(name, [{}]):
            cfg = EstimatorConfig(estimator=name, **kw)
            out = ESTIMATORS.get(name)(inputs, cfg)
            expected = ref.REFERENCES[name](inputs, cfg)
            if isinstance(expected, tuple):
                expected, expected_returns = expected
                torch.testing.assert_close(out.returns, t(expected_returns))
            torch.testing.assert_close(out.advantages, t(expected), atol=1e-9, rtol=1e-7)


def test_float32_inputs_give_float32_advantages():
    inputs = ref.random_inputs(0, 8, 10, 3, 4, dtype=torch.float32)
    for name in ALL:
        out = run(name, inputs)
        assert out.advantages.dtype == torch.float32, name
        assert torch.isfinite(out.advantages).all(), name


# --------------------------------------------------------------------------- invariances


@pytest.mark.parametrize("name", ALL)
def test_zero_on_non_action_tokens_and_inputs_untouched(name):
    inputs = ref.random_inputs(3, 8, 14, 3, 4)
    before = {f: getattr(inputs, f).clone() for f in ("turn_rewards", "outcome", "values", "state_keys")}
    adv = run(name, inputs).advantages
    assert (adv[~inputs.action_mask] == 0).all()
    for f, v in before.items():
        assert torch.equal(getattr(inputs, f), v), f"{name} modified inputs.{f}"


@pytest.mark.parametrize("name", ALL)
def test_values_on_env_tokens_do_not_change_advantages(name):
    inputs = ref.random_inputs(5, 10, 16, 3, 5)
    out = run(name, inputs)
    noisy = inputs.values + 100.0 * torch.randn_like(inputs.values) * (~inputs.action_mask)
    out2 = run(name, replace(inputs, values=noisy))
    torch.testing.assert_close(out2.advantages, out.advantages)
    if out.returns is not None:
        torch.testing.assert_close(out2.returns, out.returns)


@pytest.mark.parametrize("name", ALL)
def test_permuting_trajectories_permutes_advantages(name):
    inputs = ref.random_inputs(7, 12, 16, 3, 4)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    permuted = AdvantageInputs(
        **{
            f: (getattr(inputs, f)[perm] if isinstance(getattr(inputs, f), torch.Tensor) else getattr(inputs, f))
            for f in AdvantageInputs.__dataclass_fields__
        }
    )
    torch.testing.assert_close(run(name, permuted).advantages, run(name, inputs).advantages[perm])


@pytest.mark.parametrize(
    "name", ["grpo", "dr_grpo", "rloo", "gigpo", "mt_grpo", "igpo", "reinforce_pp_baseline"]
)
def test_group_with_equal_rewards_gets_exactly_zero(name):
    inputs = ref.random_inputs(11, 12, 16, 3, 4, dtype=torch.float32)
    group = inputs.group_ids == inputs.group_ids[0]
    # every reward of the first group equal: 0.1 per turn (float32, not exactly representable)
    tr = torch.where(group.unsqueeze(1), 0.1, inputs.turn_rewards).float()
    tm = torch.where(group.unsqueeze(1), torch.ones_like(inputs.turn_mask), inputs.turn_mask)
    outcome = torch.where(group, 0.3, inputs.outcome).float()
    # same tool-call turn, so MT-GRPO's turn rewards (sums over turns before it) agree too
    ftt = torch.where(group, 0, inputs.first_tool_turn)
    eq = replace(inputs, turn_rewards=tr, turn_mask=tm, outcome=outcome, first_tool_turn=ftt)
    cfg = {"whiten": False} if name == "reinforce_pp_baseline" else {}
    if name == "gigpo":  # equal step returns need equal turn counts and discounting
        cfg = {"step_gamma": 1.0}
        eq = replace(eq, turn_rewards=torch.where(group.unsqueeze(1), 0.0, eq.turn_rewards))
    adv = run(name, eq, **cfg).advantages
    assert (adv[group] == 0).all(), adv[group]
    assert (adv[~group] != 0).any()


def test_group_normalize_singletons_and_validity():
    x = t([1.0, 2.0, 3.0, 7.0, float("nan")])
    seg = L([0, 0, 0, 1, 1])
    out = group_normalize(x, seg, 2, valid=b([True, True, True, True, False]), eps=1e-6)
    torch.testing.assert_close(out, t([-1 / (1 + 1e-6), 0.0, 1 / (1 + 1e-6), 0.0, 0.0]))


def test_splitting_an_episode_at_done_changes_nothing():
    g = torch.Generator().manual_seed(1)
    r = torch.randn(2, 9, generator=g, dtype=D)
    v = torch.randn(2, 9, generator=g, dtype=D)
    m = torch.rand(2, 9, generator=g) > 0.25
    m[:, 3] = True
    # two episodes packed in one row: positions 0..3 and 4..8, done at 3
    dones = torch.zeros(2, 9, dtype=torch.bool)
    dones[:, 3] = True
    packed = gae_advantages(r, v, m, gamma=0.9, lam=0.7, dones=dones)
    first = gae_advantages(r[:, :4], v[:, :4], m[:, :4], gamma=0.9, lam=0.7)
    second = gae_advantages(r[:, 4:], v[:, 4:], m[:, 4:], gamma=0.9, lam=0.7)
    torch.testing.assert_close(packed, torch.cat([first, second], dim=1))
    ret = discounted_returns(r, m, gamma=0.8, dones=dones)
    torch.testing.assert_close(
        ret,
        torch.cat([discounted_returns(r[:, :4], m[:, :4], gamma=0.8), discounted_returns(r[:, 4:], m[:, 4:], gamma=0.8)], 1),
    )
    # ...and a done inside the env gap between the episodes means the same as at its last step
    assert torch.equal(gae_advantages(r, v, m, gamma=0.9, lam=0.7, dones=dones), packed)


def test_gae_matches_closed_form_sum():
    # A_t = sum_l (gamma lam)^l delta_{t+l} on a fully generated row
    g = torch.Generator().manual_seed(2)
    r, v = torch.randn(1, 6, generator=g, dtype=D), torch.randn(1, 6, generator=g, dtype=D)
    gamma, lam = 0.9, 0.8
    nxt = torch.cat([v[:, 1:], torch.zeros(1, 1, dtype=D)], 1)
    delta = r + gamma * nxt - v
    closed = [sum((gamma * lam) ** l * delta[0, s + l] for l in range(6 - s)) for s in range(6)]
    torch.testing.assert_close(gae_advantages(r, v, torch.ones(1, 6, dtype=torch.bool), gamma=gamma, lam=lam)[0], t(closed))


def test_tokenless_turn_hands_reward_to_previous_turn():
    # turn 1 generated no token (cut); its reward lands on turn 0's end token
    inputs = replace(multi_turn([[0, 0, -1]], [[0.0, 1.0]], [0], values=[[0.0, 0.0, 0.0]]))
    out = run("gae", inputs, whiten=False)
    torch.testing.assert_close(out.advantages, t([[1.0, 1.0, 0.0]]))


def test_configs_load_through_core_config():
    from mmgym.algos import LossConfig
    from mmgym.core import ConfigError, from_dict

    cfg = from_dict(EstimatorConfig, {"estimator": "gigpo", "gigpo_mode": "mean_std_norm", "gamma": 1})
    assert cfg.gigpo_mode == "mean_std_norm" and cfg.gamma == 1.0
    loss = from_dict(LossConfig, {"clip_high": 0.28, "dual_clip": 3, "agg_mode": "seq_mean_token_sum_norm"})
    assert loss.dual_clip == 3.0
    with pytest.raises(ConfigError, match="gigpo_mode"):
        from_dict(EstimatorConfig, {"gigpo_mode": "median"})


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 4), st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0])), min_size=1, max_size=24)
)
def test_group_normalize_properties(pairs):
    # within every group of >= 2 distinct values: mean 0 and unbiased std ~1 (eps aside);
    # any group of equal values: exactly 0
    seg_raw = L([p[0] for p in pairs])
    x = t([p[1] for p in pairs])
    seg, n = torch.unique(seg_raw, return_inverse=True)[1], int(torch.unique(seg_raw).numel())
    out = group_normalize(x, seg, n, eps=1e-12)
    for gid in range(n):
        members = out[seg == gid]
        vals = x[seg == gid]
        if vals.max() == vals.min():
            assert (members == 0).all()
        else:
            assert abs(members.mean().item()) < 1e-9
            assert members.std().item() == pytest.approx(1.0, abs=1e-6)
