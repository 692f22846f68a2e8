"""Advantage estimators: outcome-level (GRPO, Dr. GRPO, RLOO, REINFORCE++, GAE) and
turn-level (GiGPO, bi-level GAE, MT-GRPO, IGPO).

Every estimator has ONE signature, so the trainer never special-cases one::

    out = ESTIMATORS.get(cfg.estimator)(inputs, cfg)      # or compute_advantages(inputs, cfg)
    out.advantages   # (B, T) float, zero on every token the policy did not generate
    out.returns      # (B, T) critic targets for estimators that use a critic, else None

``inputs`` is an :class:`AdvantageInputs` (built with ``AdvantageInputs.from_batch``) and
``cfg`` one frozen :class:`EstimatorConfig` holding every hyperparameter.

Shapes: ``B`` trajectories, ``T`` token positions, ``K`` turns, ``G`` trajectories per
group (any group sizes are allowed, including 1). Group statistics use the unbiased
standard deviation (``torch.std``, as verl and TRL do); a group of one trajectory, or a
group whose rewards are all equal, gets advantage 0.

The building blocks (``group_normalize``, ``gae_advantages``, ``discounted_returns``,
``masked_whiten``, ``information_gain_rewards``) are public pure functions too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from mmgym.algos.credit import broadcast_turn_values, turn_end_positions, turn_rewards_to_tokens
from mmgym.core.registry import Registry

if TYPE_CHECKING:
    from mmgym.core.records import RolloutBatch

__all__ = [
    "ESTIMATORS",
    "AdvantageInputs",
    "AdvantageOutput",
    "Estimator",
    "EstimatorConfig",
    "compute_advantages",
    "compute_answer_logprobs",
    "dense_ids",
    "discounted_returns",
    "gae_advantages",
    "group_normalize",
    "information_gain_rewards",
    "masked_whiten",
]


# --------------------------------------------------------------------------- records


@dataclass(slots=True)
class AdvantageInputs:
    """What every estimator reads (the tensor part of ``mmgym.core.RolloutBatch``).

    Fields (shapes):
      action_mask (B, T) bool: tokens the policy generated (advantages live here only).
      token_turn (B, T) long: turn index of each generated token, -1 elsewhere.
      turn_rewards (B, K) float: reward earned at each turn; the outcome is included in
        the last real turn's reward.
      turn_mask (B, K) bool: real turns.
      state_keys (B, K) long: GiGPO anchor-state id of the state before each turn
        (see ``credit.anchor_ids``), -1 = no anchor.
      group_ids (B,) long: trajectories of one prompt/task share an id.
      outcome (B,) float: the episode return the outcome estimators normalise.
      first_tool_turn (B,) long: index of the first turn followed by a tool result, K if
        none (MT-GRPO's split point).
      values (B, T) float, optional: critic values on generated tokens (GAE, bi-level GAE);
        values on other tokens are never read.
      turn_values (B, K) float, optional: turn-level values V(e_k) for bi-level GAE
        (default: ``values`` at each turn's end token).
      token_rewards (B, T) float, optional: extra per-token rewards added to the turn
        rewards by the token-level estimators (``gae``, ``reinforce_pp``), e.g. a
        per-token KL penalty (REINFORCE++ puts -beta*KL in the reward).
      extra: free-form extras for estimators that read more: ``prime`` reads
        ``extra["process_rewards"]`` (B, T); the others ignore it.
    """

    action_mask: torch.Tensor
    token_turn: torch.Tensor
    turn_rewards: torch.Tensor
    turn_mask: torch.Tensor
    state_keys: torch.Tensor
    group_ids: torch.Tensor
    outcome: torch.Tensor
    first_tool_turn: torch.Tensor
    values: torch.Tensor | None = None
    turn_values: torch.Tensor | None = None
    token_rewards: torch.Tensor | None = None
    extra: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.action_mask.dim() != 2:
            raise ValueError(f"action_mask must be (B, T), got shape {tuple(self.action_mask.shape)}")
        if self.turn_rewards.dim() != 2:
            raise ValueError(f"turn_rewards must be (B, K), got shape {tuple(self.turn_rewards.shape)}")
        b, t = self.action_mask.shape
        k = self.turn_rewards.shape[1]
        expect = {
            "token_turn": (b, t),
            "turn_mask": (b, k),
            "state_keys": (b, k),
            "group_ids": (b,),
            "outcome": (b,),
            "first_tool_turn": (b,),
            "values": (b, t),
            "turn_values": (b, k),
            "token_rewards": (b, t),
        }
        for name, shape in expect.items():
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(
                    f"AdvantageInputs.{name} has shape {tuple(value.shape)}, expected {shape} "
                    f"(B={b} trajectories, T={t} tokens, K={k} turns)"
                )
        for name in ("action_mask", "turn_mask"):
            if getattr(self, name).dtype != torch.bool:
                raise ValueError(f"AdvantageInputs.{name} must be a bool tensor, got {getattr(self, name).dtype}")
        for name in ("token_turn", "state_keys", "group_ids", "first_tool_turn"):
            value = getattr(self, name)
            if value.is_floating_point() or value.dtype == torch.bool:
                raise ValueError(f"AdvantageInputs.{name} must be an integer tensor, got {value.dtype}")

    @classmethod
    def from_batch(
        cls, batch: RolloutBatch, *, turn_values: torch.Tensor | None = None, extra: dict[str, Any] | None = None
    ) -> AdvantageInputs:
        """Take the estimator fields from a ``RolloutBatch`` (no copies); ``turn_values`` and
        ``extra`` (e.g. PRIME's ``{"process_rewards": (B, T)}``) are passed through."""
        return cls(
            action_mask=batch.action_mask.bool(),
            token_turn=batch.token_turn,
            turn_rewards=batch.turn_rewards,
            turn_mask=batch.turn_mask.bool(),
            state_keys=batch.state_keys,
            group_ids=batch.group_ids,
            outcome=batch.outcome,
            first_tool_turn=batch.first_tool_turn,
            values=batch.values,
            turn_values=turn_values,
            extra=extra,
        )

    @classmethod
    def single_turn(
        cls,
        outcome: torch.Tensor,
        group_ids: torch.Tensor,
        action_mask: torch.Tensor,
        *,
        values: torch.Tensor | None = None,
    ) -> AdvantageInputs:
        """Inputs for one-turn episodes (prompt -> response -> reward), K = 1.

        Args:
          outcome: (B,) float reward; group_ids: (B,) long; action_mask: (B, T) bool;
          values: optional (B, T) critic values.
        """
        action_mask = action_mask.bool()
        b = outcome.shape[0]
        token_turn = torch.where(action_mask, 0, -1).to(torch.long)
        return cls(
            action_mask=action_mask,
            token_turn=token_turn,
            turn_rewards=outcome.reshape(b, 1),
            turn_mask=torch.ones(b, 1, dtype=torch.bool, device=outcome.device),
            state_keys=torch.full((b, 1), -1, dtype=torch.long, device=outcome.device),
            group_ids=group_ids,
            outcome=outcome,
            first_tool_turn=torch.ones(b, dtype=torch.long, device=outcome.device),
            values=values,
        )


@dataclass(slots=True)
class AdvantageOutput:
    """What every estimator returns.

    advantages (B, T) float: zero on tokens the policy did not generate.
    returns (B, T) float or None: value targets for the critic (``gae``, ``bilevel_gae``).
    """

    advantages: torch.Tensor
    returns: torch.Tensor | None = None


@dataclass(frozen=True)
class EstimatorConfig:
    """Every advantage-estimator hyperparameter, with the published defaults."""

    estimator: str = "grpo"
    """Registered name used by ``compute_advantages``: grpo, dr_grpo, rloo, reinforce_pp,
    reinforce_pp_baseline, gae, gigpo, bilevel_gae, mt_grpo, igpo."""
    eps: float = 1e-6
    """Added to the group std in every std normalisation (GRPO's epsilon)."""
    gamma: float = 1.0
    """Token-level discount for ``gae`` and ``reinforce_pp`` (verl default 1.0; RLinf
    uses 0.99 for VLA PPO)."""
    lam: float = 1.0
    """GAE lambda for ``gae`` and the token level of ``bilevel_gae`` (verl/VAGEN 1.0;
    0.95 is common with a well-trained critic)."""
    whiten: bool = True
    """Whiten advantages over the action mask of the whole batch (``gae``,
    ``bilevel_gae``, ``reinforce_pp``, ``reinforce_pp_baseline``)."""
    gamma_turn: float = 0.95
    """Turn-level discount of ``bilevel_gae`` (VAGEN: 0.95-0.99)."""
    lam_turn: float = 1.0
    """Turn-level GAE lambda of ``bilevel_gae``."""
    gamma_token: float = 1.0
    """Token-level discount inside a turn for ``bilevel_gae`` (VAGEN: 1.0)."""
    gigpo_weight: float = 1.0
    """w in A = A_episode + w * A_step (GiGPO Eq. 8; the paper uses 1)."""
    gigpo_mode: Literal["mean_norm", "mean_std_norm"] = "mean_norm"
    """GiGPO normalisation of both levels: subtract the group mean (verl-agent default)
    or also divide by the group std."""
    step_gamma: float = 0.95
    """Discount of GiGPO's per-step returns R_t = sum_k step_gamma^(k-t) r_k."""
    mt_lambda: float = 1.0
    """MT-GRPO weight of the turn advantage on tokens up to the first tool result."""
    mt_outcome: Literal["final", "total"] = "final"
    """MT-GRPO's outcome reward R_O: ``final`` (the paper's) is the episode return minus the
    turn rewards already counted in R_T, so a tool turn's own reward is not paid again to
    every later turn; ``total`` is the episode return as given."""
    igpo_gamma: float = 1.0
    """Discount of IGPO's cumulative turn advantage (IGPO default 1.0)."""
    igpo_norm: Literal["joint", "separate"] = "joint"
    """IGPO: normalise info-gain and final-answer rewards together (default) or apart."""

    def __post_init__(self) -> None:
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0 (it keeps the std division finite), got {self.eps}")
        for name in ("gamma", "lam", "gamma_turn", "lam_turn", "gamma_token", "step_gamma", "igpo_gamma"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if self.gigpo_mode not in ("mean_norm", "mean_std_norm"):
            raise ValueError(f"gigpo_mode must be 'mean_norm' or 'mean_std_norm', got {self.gigpo_mode!r}")
        if self.mt_outcome not in ("final", "total"):
            raise ValueError(f"mt_outcome must be 'final' or 'total', got {self.mt_outcome!r}")
        if self.igpo_norm not in ("joint", "separate"):
            raise ValueError(f"igpo_norm must be 'joint' or 'separate', got {self.igpo_norm!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown advantage estimator {self.estimator!r}; known: {', '.join(ESTIMATORS.names())}")


Estimator = Callable[[AdvantageInputs, EstimatorConfig], AdvantageOutput]
ESTIMATORS: Registry[Estimator] = Registry("advantage estimator")


def compute_advantages(inputs: AdvantageInputs, cfg: EstimatorConfig) -> AdvantageOutput:
    """Run the estimator named by ``cfg.estimator``."""
    return ESTIMATORS.get(cfg.estimator)(inputs, cfg)


# --------------------------------------------------------------------------- building blocks


def dense_ids(ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map arbitrary integer ids to ``0..S-1``.

    Args:
      ids: (N,) integer tensor.

    Returns:
      ((N,) long dense ids, S the number of distinct ids).
    """
    uniq, inverse = torch.unique(ids, return_inverse=True)
    return inverse, int(uniq.shape[0])


def _zero(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=like.dtype, device=like.device)


def group_normalize(
    scores: torch.Tensor,
    segments: torch.Tensor,
    num_segments: int,
    *,
    valid: torch.Tensor | None = None,
    std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``(x - mean_g) / (std_g + eps)`` (or ``x - mean_g``) within segments, by scatter.

    GRPO's group-relative advantage (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300,
    §4.1.2: A_i = (r_i - mean(r)) / std(r)). The std is unbiased; a segment of one
    element, or of equal elements, normalises to exactly 0.

    Args:
      scores: (N,) float.
      segments: (N,) long in ``[0, num_segments)``.
      num_segments: S.
      valid: (N,) bool, elements that take part (others get 0 and do not count).
      std: divide by the segment std.
      eps: added to the std.

    Returns:
      (N,) float, 0 where ``valid`` is False.
    """
    dtype, device = scores.dtype, scores.device
    w = None if valid is None else valid.to(dtype)
    x = scores if valid is None else torch.where(valid, scores, _zero(scores))
    # Centre on each segment's minimum first: equal values then give exactly 0 (a plain
    # float mean of equal values can be off by an ulp, which eps-division would amplify).
    fill = torch.finfo(dtype).max
    lowest = torch.full((num_segments,), fill, dtype=dtype, device=device)
    lowest = lowest.scatter_reduce(
        0, segments, x if valid is None else torch.where(valid, x, fill), reduce="amin", include_self=True
    )
    shifted = x - lowest.index_select(0, segments)
    if w is not None:
        shifted = shifted * w
    count = torch.zeros(num_segments, dtype=dtype, device=device).index_add(
        0, segments, torch.ones_like(scores) if w is None else w
    )
    total = torch.zeros(num_segments, dtype=dtype, device=device).index_add(0, segments, shifted)
    centred = shifted - (total / count.clamp(min=1)).index_select(0, segments)
    if w is not None:
        centred = centred * w
    if not std:
        return centred
    sq = torch.zeros(num_segments, dtype=dtype, device=device).index_add(0, segments, centred * centred)
    sd = (sq / (count - 1).clamp(min=1)).sqrt()
    return centred / (sd.index_select(0, segments) + eps)


def _group_dense(inputs: AdvantageInputs) -> tuple[torch.Tensor, int]:
    return dense_ids(inputs.group_ids)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
    """Whiten ``values`` over the entries where ``mask`` is True (verl ``masked_whiten``).

    ``(x - mean) * rsqrt(var + 1e-8)`` with the unbiased variance over the masked entries;
    entries outside the mask come out 0. With ``shift_mean=False`` only the scale changes.

    Args:
      values: (B, T) float.  mask: (B, T) bool.

    Returns:
      (B, T) float.
    """
    mask = mask.bool()
    zero = _zero(values)
    count = mask.sum()
    mean = torch.where(mask, values, zero).sum() / count.clamp(min=1)
    centred = torch.where(mask, values - mean, zero).reshape(-1)
    var = torch.dot(centred, centred) / (count - 1).clamp(min=1)
    out = (values - mean) if shift_mean else values
    out = out * torch.rsqrt(var + 1e-8)
    return torch.where(mask, out, zero)


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float,
    lam: float,
    dones: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generalised advantage estimation over the masked positions of each row.

    Schulman et al. 2016 (arXiv:1506.02438) Eq. 16: A_t = sum_l (gamma*lam)^l delta_{t+l},
    delta_t = r_t + gamma*V(s_{t+1}) - V(s_t). Positions where ``mask`` is False are
    skipped (the recursion passes through them, as in verl's multi-turn GAE): the "next"
    value of a step is the value at the next *masked* position, so values and rewards on
    unmasked (env) positions are never read. After the last masked position of a row, or
    at a position with ``dones`` True (an episode's last step), nothing is bootstrapped.

    Vectorised across B: one reverse scan over the N positions.

    Args:
      rewards: (B, N) float, reward after each step.
      values: (B, N) float.
      mask: (B, N) bool, real steps.
      gamma, lam: discount and GAE lambda.
      dones: (B, N) bool, optional episode ends (several episodes may share a row).

    Returns:
      (B, N) advantages, 0 where ``mask`` is False.
    """
    batch, length = rewards.shape
    zero = _zero(rewards)
    # Column-major copies make each step's slice contiguous; r - V is taken once up front.
    r_minus_v = (rewards - values.to(rewards.dtype)).t().contiguous()
    v = values.to(rewards.dtype).t().contiguous()
    m = mask.bool().t().contiguous()
    d = dones.bool().t().contiguous() if dones is not None else None
    out = torch.empty(length, batch, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros(batch, dtype=rewards.dtype, device=rewards.device)
    last = torch.zeros(batch, dtype=rewards.dtype, device=rewards.device)
    gl = gamma * lam
    for t in range(length - 1, -1, -1):
        mt = m[t]
        if d is not None:
            dt = d[t]
            next_value = torch.where(dt, zero, next_value)
            last = torch.where(dt, zero, last)
        # delta_t + gamma*lam*A_{t+1} = (r_t - V_t) + gamma*V_next + gamma*lam*A_{t+1}
        adv = torch.add(r_minus_v[t], next_value, alpha=gamma).add_(last, alpha=gl)
        torch.where(mt, adv, zero, out=out[t])
        last = torch.where(mt, adv, last)
        next_value = torch.where(mt, v[t], next_value)
    return out.t()


def discounted_returns(
    rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float, dones: torch.Tensor | None = None
) -> torch.Tensor:
    """R_t = sum_{k >= t, masked} gamma^(#masked steps between) r_k, per row.

    The discounted return of every masked step (GAE with V = 0 and lam = 1); unmasked
    positions are skipped and come out 0; ``dones`` (B, N) ends an episode inside a row.

    Args:
      rewards: (B, N) float; mask: (B, N) bool; gamma: discount.

    Returns:
      (B, N) float.
    """
    return gae_advantages(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0, dones=dones)


def _to_tokens(per_seq: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, T): the scalar on every generated token, 0 elsewhere."""
    return torch.where(action_mask, per_seq.unsqueeze(1), _zero(per_seq))


def _last_turn_index(turn_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last real turn, -1 if none."""
    k = torch.arange(turn_mask.shape[1], device=turn_mask.device)
    lowest = torch.full(turn_mask.shape[:1] + (1,), -1, dtype=torch.long, device=turn_mask.device)
    return torch.cat([lowest, torch.where(turn_mask, k, -1)], dim=1).amax(dim=1)


# --------------------------------------------------------------------------- outcome estimators


@ESTIMATORS.register("grpo")
def grpo(inputs: AdvantageInputs, cfg: EstimatorConfig) -> AdvantageOutput:
    """GRPO (Shao et al. 2024, arXiv:2402.03300, §4.1.2, outcome supervision).

    A_i = (r_i - mean_G(r)) / (std_G(r) + eps) with r = ``outcome`` (B,), the same value
    on every generated token of trajectory i. Returns (B, T).
    """
    seg, n = _group_dense(inputs)
    adv = group_normalize(inputs.outcome, seg, n, std=True, eps=cfg.eps)
    return AdvantageOutput(_to_tokens(adv, inputs.action_mask))


@ESTIMATORS.register("dr_grpo")
def dr_grpo(inputs: AdvantageInputs, cfg: EstimatorConfig) -> AdvantageOutput:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical
    Perspective", arXiv:2503.20783, the Dr. GRPO objective that drops GRPO's std and
    length normalisers): A_i = r_i - mean_G(r), no std division.

    Pair it with ``aggregate(..., "seq_mean_token_sum_norm")`` (sum over tokens divided by
    a constant length) to remove both of GRPO's biases. Returns (B, T).
    """
    seg, n = _group_dense(inputs)
    adv = group_normalize(inputs.outcome, seg, n, std=False)
    return AdvantageOutput(_to_tokens(adv, inputs.action_mask))


@ESTIMATORS.register("rloo")
def rloo(inputs: AdvantageInputs, cfg: EstimatorConfig) -> AdvantageOutput:
    """RLOO (Kool et al. 2019 "Buy 4 REINFORCE samples"; Ahmadian et al. 2024,
    arXiv:2402.14740, the RLOO estimator):
    A_i = r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean_G(r)).

    A group of one gets 0. Returns (B, T).
    """
    seg, n = _group_dense(inputs)
    centred = group_normalize(inputs.outcome, seg, n, std=False)
    size = torch.zeros(n, dtype=inputs.outcome.dtype, device=inputs.outcome.device).index_add(
        0, seg, torch.ones_like(inputs.outcome)
    ).index_select(0, seg)
    adv = centred * size / (size - 1).clamp(min=1)
    return AdvantageOutput(_to_tokens(adv, inputs.action_mask))


def _token_rewards(inputs: AdvantageInputs) -> torch.Tensor:
    r = turn_rewards_to_tokens(inputs.turn_rewards, inputs.turn_mask, inputs.token_turn, inputs.action_mask)
    if inputs.token_rewards is not None:
        r = r + torch.where(inputs.action_mask, inputs.token_rewards.to(r.dtype), _zero(r))
    return r


@ESTIMATORS.register("reinforce_pp")
def reinforce_pp(inputs: AdvantageInputs, cfg: EstimatorConfig) -> AdvantageOutput:
    """REINFORCE++ (Hu 2025, "REINFORCE++", arXiv:2501.03262: token-level discounted
    return G_t = sum_{s >= t} gamma^(s-t) r_s, then global advantage normalisation
    A = (G - mean_batch) / std_batch).

    Token rewards: each turn's reward on its end token plus ``token_rewards`` (e.g.
    -beta*KL); G_t = sum_{s >= t} gamma^(s-t) r_s over generated tokens; A = whiten(G)
    over the action mask (``cfg.whiten``). Returns (B, T).
    """
    ret = discounted_returns(_token_rewards(inputs), inputs.action_mask, gamma=cfg.gamma)
    adv = masked_whiten(ret, inputs.action_mask) if cfg.whiten else ret
    return AdvantageOutput(adv)


@ESTIMATORS.register("reinforce_pp_baseline")
def reinforce_pp_baseline(inputs: AdvantageInputs, cfg: EstimatorConfig) -> AdvantageOutput:
    """REINFORCE++-baseline (Hu 2025, arXiv:2501.03262, the group-mean baseline variant):
    A_i = r_i - mean_G(r),
    broadcast to tokens, then whitened over the action mask of the whole batch
    (``cfg.whiten``; the global shift makes an all-equal group's advantage the small
    constant -mean/std, as in the paper and verl). Returns (B, T).
    """
    seg, n = _group_dense(inputs)
    adv = _to_tokens(group_normalize(inputs.outcome, seg, n, std=False), inputs.action_mask)
    if cfg.whiten:
        adv = masked_whiten(adv, inputs.action_mask)
    return AdvantageOutput(adv)


def _need_values(inputs: AdvantageInputs, name: str) -> torch.Tensor:
    if inputs.values is None:
        raise ValueError(
            f"advantage estimator {name!r} needs critic values: set AdvantageInputs.values (B, T) "
            "from the value head, or pick a critic-free estimator (grpo, rloo, gigpo, ...)"
        )
    return inputs.values


@ESTIMATORS.register("gae")
def gae(inputs: AdvantageInputs, cfg: EstimatorConfig) -> AdvantageOutput:
    """PPO with a critic: token-level GAE (Schulman et al. 2016, arXiv:1506.02438, Eq. 16)
    over the generated tokens; env tokens are skipped, so their values never matter.

    Token rewards: each turn's reward on its end token plus ``token_rewards``. Returns
    advantages (B, T) (whitened over the action mask if ``cfg.whiten``) and critic
    targets ``returns = A_raw + V`` (B, T), 0 off the action mask.
    """
    values = _need_values(inputs, "gae")
    rewards = _token_rewards(inputs)
    adv = gae_advantages(rewards, values, inputs.action_mask, gamma=cfg.gamma, lam=cfg.lam)
    returns = torch.where(inputs.action_mask, adv + values.to(adv.dtype), _zero(adv))
    if cfg.whiten:
        adv = masked_whiten(adv, inputs.action_mask)
    return AdvantageOutput(adv, returns)


# --------------------------------------------------------------------------- turn-level estimators


@ESTIMATORS.register("gigpo")
def gigpo(inputs: AdvantageInputs, cfg: EstimatorConfig) -> AdvantageOutput:
    """GiGPO (Feng et al. 2025, "Group-in-Group Policy Optimization for LLM Agent
    Training", arXiv:2505.10978).

    - Episode level (Eq. 3): A_E = GRPO over the group's episode returns (``outcome``),
      ``mean_norm`` (no std) or ``mean_std_norm``.
    - Anchor-state step groups (Eq. 6): real turns of the same episode group with equal
      ``state_keys`` (>= 0); a turn without a key, or alone in its step group, gets 0.
    - Step level (Eq. 7): per-turn discounted return R_k = sum_{j >= k} step_gamma^(j-k)
      r_j over ``turn_rewards``, normalised within its step group (same mode).
    - Joint (Eq. 8): A = A_E + w * A_S on each turn's generated tokens.

    Everything is scatter/unique over (B*K) steps, no Python grouping. Returns (B, T).
    """
    use_std = cfg.gigpo_mode == "mean_std_norm"
    seg, n = _group_dense(inputs)
    a_ep = group_normalize(inputs.outcome, seg, n, std=use_std, eps=cfg.eps)

    step_returns = discounted_returns(inputs.turn_rewards, inputs.turn_mask, gamma=cfg.step_gamma)
    has_anchor = inputs.turn_mask & (inputs.state_keys >= 0)
    num_turns = inputs.turn_rewards.shape[1]
    # Step group = (episode group, anchor id): combine two dense ids into one key.
    state_dense, n_states = dense_ids(torch.where(has_anchor, inputs.state_keys, -1).reshape(-1))
    key = seg.repeat_interleave(num_turns) * (n_states + 1) + state_dense
    step_seg, n_steps = dense_ids(key)
    a_step = group_normalize(
        step_returns.reshape(-1), step_seg, n_steps, valid=has_anchor.reshape(-1), std=use_std, eps=cfg.eps
    ).reshape(step_returns.shape)

    turn_adv = a_ep.unsqueeze(1) + cfg.gigpo_weight * a_step
    return AdvantageOutput(broadcast_turn_values(turn_adv, inputs.token_turn, inputs.action_mask))


@ESTIMATORS.register("bilevel_gae")
def bilevel_gae(inputs: AdvantageInputs, cfg: EstimatorConfig) -> AdvantageOutput:
    """Bi-level GAE (VAGEN: Wang et al. 2025, "VAGEN: Reinforcing World Model Reasoning
    for Multi-Turn VLM Agents", arXiv:2510.16907, turn-aware credit assignment; after
    RAGEN's bi-level GAE).

    1. Turn level, over each trajectory's turn end tokens e_k:
       delta_k = r_k + gamma_turn * V(e_{k+1}) - V(e_k),
       A_k = delta_k + gamma_turn * lam_turn * A_{k+1}  (no bootstrap after the last turn).
    2. The turn target A_k + V(e_k) replaces the reward at e_k; token-level GAE with
       ``gamma_token`` and ``lam`` then runs inside each turn, restarting at every turn end
       (so A(e_k) = A_k, and earlier tokens add gamma_token * V(t+1) - V(t) terms).
    3. Whiten over the action mask (``cfg.whiten``).

    V(e_k) is ``turn_values`` if given, else ``values`` at the end token. Turns without
    generated tokens pass their reward to the previous turn's end token. Returns
    advantages (B, T) and critic targets ``returns = A_token + V`` (B, T).
    """
    values = _need_values(inputs, "bilevel_gae")
    num_turns = inputs.turn_rewards.shape[1]
    ends = turn_end_positions(inputs.token_turn, inputs.action_mask, num_turns)
    has_end = (ends >= 0) & inputs.turn_mask
    ends_idx = ends.clamp(min=0)
    token_r = turn_rewards_to_tokens(inputs.turn_rewards, inputs.turn_mask, inputs.token_turn, inputs.action_mask)
    turn_r = torch.gather(token_r, 1, ends_idx)
    v_end = torch.gather(values.to(token_r.dtype), 1, ends_idx)
    v_turn = inputs.turn_values.to(token_r.dtype) if inputs.turn_values is not None else v_end
    turn_r = torch.where(has_end, turn_r, _zero(turn_r))
    a_turn = gae_advantages(turn_r, v_turn, has_end, gamma=cfg.gamma_turn, lam=cfg.lam_turn)
    target = torch.where(has_end, a_turn + v_turn, _zero(a_turn))

    # Turns without an end token scatter into a spare column T that is dropped.
    length = inputs.action_mask.shape[1]
    slot = torch.where(has_end, ends, length)
    is_end = torch.zeros(slot.shape[0], length + 1, dtype=torch.bool, device=slot.device)
    is_end = is_end.scatter(1, slot, has_end)[:, :length]
    rewards = torch.zeros(slot.shape[0], length + 1, dtype=token_r.dtype, device=slot.device)
    rewards = rewards.scatter_add(1, slot, target)[:, :length]
    adv = gae_advantages(
        rewards, values, inputs.action_mask, gamma=cfg.gamma_token, lam=cfg.lam, dones=is_end
    )
    returns = torch.where(inputs.action_mask, adv + values.to(adv.dtype), _zero(adv))
    if cfg.whiten:
        adv = masked_whiten(adv, inputs.action_mask)
    return AdvantageOutput(adv, returns)


@ESTIMATORS.register("mt_grpo")
def mt_grpo(inputs: AdvantageInputs, cfg: EstimatorConfig) -> AdvantageOutput:
    """MT-GRPO (Zeng et al. 2025, "Reinforcing Multi-Turn Reasoning in LLM Agents via
    Turn-Level Credit Assignment", arXiv:2505.11821, the MT-GRPO advantage
    A = A^O + lambda * A^T on first-turn tokens, A^O after).

    R_T = sum of ``turn_rewards`` over turns ``k <= first_tool_turn`` that are not the last
    real turn (the last turn holds the outcome). R_O is the outcome reward: with
    ``mt_outcome="final"`` (default, the paper's split of turn-level and outcome rewards)
    ``outcome - R_T``, since ``outcome`` is the whole episode return and would otherwise pay
    the tool turn's reward to the answer turn too (a wrong answer after a rewarded tool call
    would be pushed up); with ``"total"`` ``outcome`` as given. Each is GRPO-normalised
    within the group (A_T, A_O). Tokens of turns up to and including the first tool call
    get A_O + mt_lambda * A_T, later turns' tokens A_O (with no tool call at all, every
    turn is "before the tool result"). Returns (B, T).
    """
    seg, n = _group_dense(inputs)
    k = torch.arange(inputs.turn_rewards.shape[1], device=inputs.turn_rewards.device)
    last = _last_turn_index(inputs.turn_mask)
    early = k.unsqueeze(0) <= inputs.first_tool_turn.unsqueeze(1)
    in_turn_reward = inputs.turn_mask & early & (k.unsqueeze(0) != last.unsqueeze(1))
    r_turn = torch.where(in_turn_reward, inputs.turn_rewards, _zero(inputs.turn_rewards)).sum(dim=1)
    a_turn = group_normalize(r_turn, seg, n, std=True, eps=cfg.eps)
    r_out = inputs.outcome - r_turn if cfg.mt_outcome == "final" else inputs.outcome
    a_out = group_normalize(r_out, seg, n, std=True, eps=cfg.eps)
    per_turn = a_out.unsqueeze(1) + torch.where(early, cfg.mt_lambda * a_turn.unsqueeze(1), _zero(a_turn))
    return AdvantageOutput(broadcast_turn_values(per_turn, inputs.token_turn, inputs.action_mask))


@ESTIMATORS.register("igpo")
def igpo(inputs: AdvantageInputs, cfg: EstimatorConfig) -> AdvantageOutput:
    """IGPO (Wang et al. 2025, "Information Gain-based Policy Optimization",
    arXiv:2510.14967: turn rewards r_t, group normalisation Ahat = (r - mean_G)/std_G
    over all turn rewards of the group, discounted accumulation over turns).

    ``turn_rewards`` must already hold the IGPO rewards: information gains on the
    intermediate turns and the answer reward on the last (build them with
    :func:`information_gain_rewards`). All real turn rewards of a group are normalised
    together (``igpo_norm="joint"``; ``"separate"`` normalises info gains and final
    rewards apart), then A_k = sum_{j >= k} igpo_gamma^(j-k) Ahat_j, and A_k goes to the
    tokens of turn k. Returns (B, T).
    """
    seg, n = _group_dense(inputs)
    b, num_turns = inputs.turn_rewards.shape
    flat = inputs.turn_rewards.reshape(-1)
    valid = inputs.turn_mask.reshape(-1)
    turn_seg = seg.repeat_interleave(num_turns)
    if cfg.igpo_norm == "joint":
        norm = group_normalize(flat, turn_seg, n, valid=valid, std=True, eps=cfg.eps)
    else:
        is_last = torch.arange(num_turns, device=flat.device).unsqueeze(0) == _last_turn_index(inputs.turn_mask).unsqueeze(1)
        kind = is_last.reshape(-1).long()
        norm = group_normalize(flat, turn_seg * 2 + kind, 2 * n, valid=valid, std=True, eps=cfg.eps)
    norm = norm.reshape(b, num_turns)
    per_turn = discounted_returns(norm, inputs.turn_mask, gamma=cfg.igpo_gamma)
    return AdvantageOutput(broadcast_turn_values(per_turn, inputs.token_turn, inputs.action_mask))


def information_gain_rewards(
    turn_logprob_means: torch.Tensor,
    turn_mask: torch.Tensor,
    *,
    final_reward: torch.Tensor | None = None,
) -> torch.Tensor:
    """IGPO turn rewards (Wang et al. 2025, arXiv:2510.14967, the information-gain reward
    r_t = p_t - p_{t-1}).

    p_t = exp(mean_j log pi(a_j | history after t turns)) is the policy's teacher-forced
    probability of the ground-truth answer a; turn k's reward is p_{k+1} - p_k. The last
    real turn gets ``final_reward`` (the answer F1 / accuracy, + format) when given.

    Args:
      turn_logprob_means: (B, K+1) float; column t is the mean answer-token log-prob
        given the history after t turns (column 0: the prompt alone).
      turn_mask: (B, K) bool, real turns (a prefix of each row).
      final_reward: (B,) float, optional outcome reward for the last real turn.

    Returns:
      (B, K) float turn rewards, 0 on padded turns. Pure: inputs are not modified.
    """
    b, k = turn_mask.shape
    if turn_logprob_means.shape != (b, k + 1):
        raise ValueError(
            f"turn_logprob_means must be (B, K+1) = {(b, k + 1)} for turn_mask {(b, k)}, "
            f"got {tuple(turn_logprob_means.shape)}"
        )
    p = turn_logprob_means.exp()
    gain = p[:, 1:] - p[:, :-1]
    zero = _zero(gain)
    if final_reward is not None:
        last = _last_turn_index(turn_mask)
        is_last = torch.arange(k, device=gain.device).unsqueeze(0) == last.unsqueeze(1)
        gain = torch.where(is_last, final_reward.to(gain.dtype).unsqueeze(1), gain)
    return torch.where(turn_mask, gain, zero)


PolicyLogprobFn = Callable[[Sequence[Any], Sequence[Any]], Sequence[torch.Tensor]]


def compute_answer_logprobs(
    policy_fn: PolicyLogprobFn,
    histories: Sequence[Sequence[Any]],
    answers: Sequence[Any],
    *,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hook that asks a policy for IGPO's teacher-forced answer log-probs.

    Args:
      policy_fn: any callable ``policy_fn(contexts, answers) -> [logprobs_i]`` that
        returns, for each (context, answer) pair, a 1-D tensor with the log-probability
        of every answer token given the context (teacher forcing). It is called under
        ``torch.no_grad()`` with at most ``batch_size`` pairs; the agents package
        provides one, tests pass a stub.
      histories: B rows; row b holds K_b + 1 contexts: the prompt, then the
        conversation after each of its K_b turns.
      answers: B ground-truth answers (whatever ``policy_fn`` understands).

    Returns:
      (means (B, Kmax+1) float, mask (B, Kmax+1) bool): the mean answer-token log-prob
      for each context, 0 where the row has no such context. Feed ``means`` and
      ``mask[:, 1:]`` to :func:`information_gain_rewards`.
    """
    if len(histories) != len(answers):
        raise ValueError(f"histories has {len(histories)} rows but answers has {len(answers)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pairs = [(b, t, ctx, answers[b]) for b, row in enumerate(histories) for t, ctx in enumerate(row)]
    width = max((len(row) for row in histories), default=0)
    means = torch.zeros(len(histories), width, dtype=torch.float32)
    mask = torch.zeros(len(histories), width, dtype=torch.bool)
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            out = policy_fn([p[2] for p in chunk], [p[3] for p in chunk])
            if len(out) != len(chunk):
                raise ValueError(f"policy_fn returned {len(out)} results for {len(chunk)} (context, answer) pairs")
            for (b, t, _, _), lp in zip(chunk, out):
                lp = torch.as_tensor(lp, dtype=torch.float32).reshape(-1)
                if lp.numel() == 0:
                    raise ValueError(f"policy_fn returned no answer-token log-probs for row {b}, context {t}")
                means[b, t] = lp.mean().to(means.device)
                mask[b, t] = True
    return means, mask
