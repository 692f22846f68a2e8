"""PRIME: implicit process rewards from an online-trained PRM, combined with outcome
rewards by RLOO (Cui et al. 2025, "Process Reinforcement through Implicit Rewards",
arXiv:2502.01456).

The implicit PRM is a language model pi_phi of the policy's architecture (by default a
copy of the policy) scored against the frozen reference pi_ref:

    r_phi(y_t) = beta * (log pi_phi(y_t | y_<t) - log pi_ref(y_t | y_<t))     (PRIME Eq. 3)

It is trained online from outcome labels only, with the cross-entropy of PRIME Eq. 4:

    L_CE = -[ y log sigma(beta * sum_t q_t) + (1 - y) log(1 - sigma(beta * sum_t q_t)) ],
    q_t = log pi_phi(y_t) - log pi_ref(y_t)   (so beta * sum_t q_t = sum_t r_phi(y_t)).

The advantage (registered estimator ``"prime"``) applies RLOO to each reward source
separately, weights them (``process_coef`` = PRIME's ``reward_dpo_coef``, ``outcome_coef``
= ``reward_gt_coef``, both 5 in the paper), sums them into token rewards, takes the
return-to-go and whitens it. What the trainer does around it, per update:

    1. forward the PRM and the reference on the rollout: ``prm_logprobs``, ``ref_logprobs``
       (B, T) -- one extra forward of the PRM (the reference forward is shared with the
       KL term when there is one);
    2. ``PrimeConfig.update == "before"``: step the PRM on :func:`prime_prm_loss`, then
       forward it again and compute :func:`implicit_process_rewards` with the updated PRM
       (a second PRM forward); ``"after"``: compute the rewards first, then step the PRM;
    3. ``inputs.extra["process_rewards"] = implicit_process_rewards(...)`` and run the
       ``"prime"`` estimator.

Only ``mmgym.core`` and torch are imported; the trainer owns the PRM copy and its optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from mmgym.algos.advantages import (
    ESTIMATORS,
    AdvantageInputs,
    AdvantageOutput,
    EstimatorConfig,
    dense_ids,
    discounted_returns,
    masked_whiten,
)

__all__ = [
    "PrimeConfig",
    "PrimeEstimatorConfig",
    "implicit_process_rewards",
    "prime_advantages",
    "prime_prm_loss",
    "rloo_token_rewards",
]


@dataclass(frozen=True)
class PrimeConfig:
    """PRIME hyperparameters (defaults from the PRIME paper and its released recipe)."""

    update: Literal["before", "after"] = "before"
    """Step the PRM on the current batch's outcome labels before the process rewards are
    computed (PRIME's default: the rewards then come from the updated PRM, one more PRM
    forward) or after (the rewards come from the PRM as it was at rollout time)."""
    beta: float = 0.05
    """beta of r_phi = beta * log(pi_phi / pi_ref), used both for the rewards and the CE loss."""
    process_coef: float = 5.0
    """Weight of the RLOO'd process rewards (PRIME ``reward_dpo_coef``)."""
    outcome_coef: float = 5.0
    """Weight of the RLOO'd outcome reward (PRIME ``reward_gt_coef``)."""

    def __post_init__(self) -> None:
        if self.update not in ("before", "after"):
            raise ValueError(f"PrimeConfig.update must be 'before' or 'after', got {self.update!r}")
        if not self.beta > 0:
            raise ValueError(f"PrimeConfig.beta must be > 0 (PRIME uses 0.05), got {self.beta}")
        if self.process_coef < 0 or self.outcome_coef < 0:
            raise ValueError(
                f"PrimeConfig.process_coef and outcome_coef must be >= 0, got {self.process_coef}, {self.outcome_coef}"
            )
        if self.process_coef == 0 and self.outcome_coef == 0:
            raise ValueError("PrimeConfig.process_coef and outcome_coef are both 0: no reward source is left; set one > 0")


@dataclass(frozen=True)
class PrimeEstimatorConfig(EstimatorConfig):
    """``EstimatorConfig`` that also carries the :class:`PrimeConfig` (``cfg.prime``).

    Any ``EstimatorConfig`` works with the ``"prime"`` estimator: one without a ``prime``
    attribute uses ``PrimeConfig()`` defaults. ``gamma`` (return discount, PRIME: 1.0) and
    ``whiten`` (PRIME: True) are read from the base config.
    """

    estimator: str = "prime"
    prime: PrimeConfig = field(default_factory=PrimeConfig)


def _prime_cfg(cfg: EstimatorConfig) -> PrimeConfig:
    sub = getattr(cfg, "prime", None)
    if sub is None:
        return PrimeConfig()
    if not isinstance(sub, PrimeConfig):
        raise TypeError(f"cfg.prime must be a PrimeConfig, got {type(sub).__name__}; use PrimeEstimatorConfig(prime=PrimeConfig(...))")
    return sub


def _zero(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=like.dtype, device=like.device)


# --------------------------------------------------------------------------- PRM


def implicit_process_rewards(
    prm_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, *, beta: float
) -> torch.Tensor:
    """Dense implicit process rewards r_t = beta * (log pi_phi(y_t) - log pi_ref(y_t))
    (PRIME Eq. 3).

    Args:
      prm_logprobs: (B, T) log-probs of the sampled tokens under the PRM pi_phi.
      ref_logprobs: (B, T) log-probs of the same tokens under the reference pi_ref.
      mask: (B, T) bool, tokens the policy generated.
      beta: PRIME beta (0.05).

    Returns:
      (B, T) float, detached (a reward, not a loss), 0 off the mask (padding may hold
      -inf there; it is never read).
    """
    mask = mask.bool()
    diff = torch.where(mask, prm_logprobs.detach() - ref_logprobs.detach().to(prm_logprobs.dtype), _zero(prm_logprobs))
    return beta * diff


def prime_prm_loss(
    prm_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    outcome_labels: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PRM's cross-entropy loss (PRIME Eq. 4): BCE(sigma(z), y) with the sequence
    logit z = beta * sum_t (log pi_phi(y_t) - log pi_ref(y_t)) over generated tokens.

    Args:
      prm_logprobs: (B, T) PRM log-probs of the sampled tokens (carries the gradient).
      ref_logprobs: (B, T) reference log-probs (no gradient is taken through them).
      mask: (B, T) bool, generated tokens.
      outcome_labels: (B,) float in [0, 1] (verified correctness; soft labels allowed).
      beta: PRIME beta.

    Returns:
      (scalar loss, the mean BCE over the B sequences; metrics (detached): ``prm_acc``,
      the fraction whose sign of z agrees with label > 0.5, and ``prm_logit_mean``).
    """
    if outcome_labels.dim() != 1 or outcome_labels.shape[0] != prm_logprobs.shape[0]:
        raise ValueError(
            f"outcome_labels must be (B,) = ({prm_logprobs.shape[0]},), got {tuple(outcome_labels.shape)}"
        )
    mask = mask.bool()
    q = torch.where(mask, prm_logprobs - ref_logprobs.detach().to(prm_logprobs.dtype), _zero(prm_logprobs))
    logit = beta * q.sum(dim=1)
    labels = outcome_labels.to(logit.dtype)
    # BCE on the logit (log-sigmoid) rather than on sigma(z): finite for any z.
    loss = F.binary_cross_entropy_with_logits(logit, labels)
    with torch.no_grad():
        metrics = {
            "prm_acc": ((logit > 0) == (labels > 0.5)).to(logit.dtype).mean(),
            "prm_logit_mean": logit.mean(),
        }
    return loss, metrics


# --------------------------------------------------------------------------- advantage


def rloo_token_rewards(
    rewards: torch.Tensor, mask: torch.Tensor, group_ids: torch.Tensor
) -> torch.Tensor:
    """PRIME's per-source RLOO on token rewards (its released ``masked_rloo``).

    With G samples in a group and m_j the mean of sample j's rewards over its masked
    positions (0 if it has none):  r'_t = r_t * G / (G - 1) - (sum_j m_j) / (G - 1).
    For a source with one masked position per sample (the outcome) this is exactly RLOO,
    r_i - mean_{j != i} r_j; for dense rewards it is r_t - mean_{j != i} m_j
    + (r_t - m_i) / (G - 1). A group of one gets 0.

    Args:
      rewards: (B, T) float.  mask: (B, T) bool, where the source has rewards.
      group_ids: (B,) long.

    Returns:
      (B, T) float, 0 off the mask.
    """
    mask = mask.bool()
    zero = _zero(rewards)
    r = torch.where(mask, rewards, zero)
    count = mask.sum(dim=1).to(r.dtype)
    means = r.sum(dim=1) / count.clamp(min=1)
    seg, n = dense_ids(group_ids)
    size = torch.zeros(n, dtype=r.dtype, device=r.device).index_add(0, seg, torch.ones_like(means)).index_select(0, seg)
    total = torch.zeros(n, dtype=r.dtype, device=r.device).index_add(0, seg, means).index_select(0, seg)
    denom = (size - 1).clamp(min=1)
    out = r * (size / denom).unsqueeze(1) - (total / denom).unsqueeze(1)
    keep = mask & (size > 1).unsqueeze(1)
    return torch.where(keep, out, zero)


def _last_action_mask(action_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True at each row's last generated token."""
    length = action_mask.shape[1]
    pos = torch.arange(length, device=action_mask.device).expand_as(action_mask)
    last = torch.where(action_mask, pos, -1).amax(dim=1, keepdim=True)
    return action_mask & (pos == last)


def prime_advantages(
    process_rewards: torch.Tensor,
    outcome: torch.Tensor,
    action_mask: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    process_coef: float,
    outcome_coef: float,
    gamma: float = 1.0,
    whiten: bool = True,
) -> torch.Tensor:
    """PRIME's combined advantage (PRIME §3.3, Eq. 5, in its released form).

    1. process source: ``rloo_token_rewards(process_rewards, action_mask)``;
    2. outcome source: ``outcome`` placed on each row's last generated token, then
       ``rloo_token_rewards`` (= RLOO of the outcome);
    3. token reward R_t = process_coef * (1) + outcome_coef * (2);
    4. return-to-go A_t = sum_{s >= t} gamma^(#generated tokens between) R_s over the
       generated tokens (env tokens are skipped), whitened over the action mask if
       ``whiten``.

    Args:
      process_rewards: (B, T) float, ``implicit_process_rewards`` (0 off the mask).
      outcome: (B,) float outcome reward (verified accuracy).
      action_mask: (B, T) bool.  group_ids: (B,) long.
      process_coef, outcome_coef: source weights (PRIME: 5 and 5).
      gamma: return discount (PRIME: 1).  whiten: whiten the result (PRIME: True).

    Returns:
      (B, T) float advantages, 0 off the action mask.
    """
    action_mask = action_mask.bool()
    dtype = process_rewards.dtype if process_rewards.is_floating_point() else outcome.dtype
    total = torch.zeros(action_mask.shape, dtype=dtype, device=action_mask.device)
    if process_coef != 0:
        total = total + process_coef * rloo_token_rewards(process_rewards.to(dtype), action_mask, group_ids)
    if outcome_coef != 0:
        last = _last_action_mask(action_mask)
        placed = torch.where(last, outcome.to(dtype).unsqueeze(1), _zero(total))
        total = total + outcome_coef * rloo_token_rewards(placed, last, group_ids)
    adv = discounted_returns(total, action_mask, gamma=gamma)
    return masked_whiten(adv, action_mask) if whiten else adv


@ESTIMATORS.register("prime")
def prime(inputs: AdvantageInputs, cfg: EstimatorConfig) -> AdvantageOutput:
    """PRIME (Cui et al. 2025, arXiv:2502.01456): RLOO per reward source, weighted, summed,
    return-to-go, whitened -- see :func:`prime_advantages`.

    Reads ``inputs.extra["process_rewards"]`` (B, T) (from :func:`implicit_process_rewards`),
    ``inputs.outcome`` (B,), ``cfg.prime`` (a :class:`PrimeConfig`, defaults if absent),
    ``cfg.gamma`` and ``cfg.whiten``. Returns advantages (B, T), no critic returns.
    """
    pc = _prime_cfg(cfg)
    extra = inputs.extra or {}
    process = extra.get("process_rewards")
    if process is None:
        if pc.process_coef != 0:
            raise ValueError(
                "advantage estimator 'prime' needs inputs.extra['process_rewards'] (B, T): compute them with "
                "implicit_process_rewards(prm_logprobs, ref_logprobs, action_mask, beta=...), or set "
                "PrimeConfig(process_coef=0) for outcome-only RLOO"
            )
        process = torch.zeros(inputs.action_mask.shape, dtype=inputs.outcome.dtype, device=inputs.outcome.device)
    if tuple(process.shape) != tuple(inputs.action_mask.shape):
        raise ValueError(
            f"inputs.extra['process_rewards'] has shape {tuple(process.shape)}, expected (B, T) = "
            f"{tuple(inputs.action_mask.shape)}"
        )
    adv = prime_advantages(
        process,
        inputs.outcome,
        inputs.action_mask,
        inputs.group_ids,
        process_coef=pc.process_coef,
        outcome_coef=pc.outcome_coef,
        gamma=cfg.gamma,
        whiten=cfg.whiten,
    )
    return AdvantageOutput(adv)
