"""Policy losses, KL to a reference, entropy, value loss, and loss aggregation.

Every policy loss has ONE signature (registry ``POLICY_LOSSES``)::

    per_token, metrics = POLICY_LOSSES.get(name)(logprobs, old_logprobs, advantages, mask, cfg)
    loss = aggregate(per_token, mask, cfg.agg_mode, norm_length=cfg.norm_length)

with ``logprobs``, ``old_logprobs``, ``advantages`` and ``mask`` all (B, T) (mask: the
tokens the policy generated), ``per_token`` (B, T) to be *minimised* (0 off the mask)
and ``metrics`` a dict of detached scalar tensors (no ``.item()``: the trainer logs them).
A typical total loss::

    loss = aggregate(pg + cfg.kl_coef * kl_penalty(logprobs, ref_logprobs, kind=cfg.kl_kind)
                     - cfg.entropy_coef * entropy, mask, cfg.agg_mode)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from mmgym.core.registry import Registry

__all__ = [
    "AGGREGATIONS",
    "POLICY_LOSSES",
    "AggMode",
    "KLKind",
    "LossConfig",
    "PolicyLoss",
    "aggregate",
    "entropy_from_logits",
    "gspo_loss",
    "kl_penalty",
    "ppo_clip_loss",
    "value_loss",
]

AggMode = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
KLKind = Literal["k1", "k2", "k3", "low_var_kl"]

# exp() of a log-ratio beyond this overflows float32 long before it means anything.
_LOG_RATIO_CLAMP = 20.0


@dataclass(frozen=True)
class LossConfig:
    """Every policy-loss hyperparameter, with the published defaults."""

    policy_loss: str = "ppo_clip"
    """Registered name: ppo_clip or gspo."""
    clip_low: float = 0.2
    """PPO lower clip: ratio >= 1 - clip_low (DAPO eps_low 0.2)."""
    clip_high: float = 0.2
    """PPO upper clip: ratio <= 1 + clip_high (DAPO clip-higher: 0.28)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 (Ye et al. 2020, e.g. 3.0): for A < 0 the loss is capped at
    -c*A. None disables it."""
    gspo_clip_low: float = 3e-4
    """GSPO lower clip of the sequence ratio (Zheng et al. 2025: 3e-4)."""
    gspo_clip_high: float = 4e-4
    """GSPO upper clip of the sequence ratio (Zheng et al. 2025: 4e-4)."""
    kl_coef: float = 0.0
    """Weight of the KL-to-reference loss term (0 = no reference model; DAPO uses none,
    Chain-of-Focus 0.001 with k3)."""
    kl_kind: KLKind = "k3"
    """KL estimator: k1, k2 or k3 (= "low_var_kl")."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss)."""
    agg_mode: AggMode = "token_mean"
    """How per-token losses become one number (see ``aggregate``)."""
    norm_length: int | None = None
    """Constant divisor of ``seq_mean_token_sum_norm`` (Dr. GRPO: the max generation
    length); None uses the padded length T."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"clip_low must lie in [0, 1) so that 1 - clip_low > 0, got {self.clip_low}")
        if self.clip_high < 0.0:
            raise ValueError(f"clip_high must be >= 0, got {self.clip_high}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (e.g. 3.0) or None, got {self.dual_clip}")
        if not 0.0 <= self.gspo_clip_low < 1.0 or self.gspo_clip_high < 0.0:
            raise ValueError(
                f"gspo_clip_low must lie in [0, 1) and gspo_clip_high be >= 0, got "
                f"{self.gspo_clip_low}, {self.gspo_clip_high}"
            )
        if self.kl_kind not in ("k1", "k2", "k3", "low_var_kl"):
            raise ValueError(f"kl_kind must be one of k1, k2, k3, low_var_kl; got {self.kl_kind!r}")
        if self.kl_coef < 0 or self.entropy_coef < 0:
            raise ValueError(f"kl_coef and entropy_coef must be >= 0, got {self.kl_coef}, {self.entropy_coef}")
        if self.agg_mode not in AGGREGATIONS:
            raise ValueError(f"unknown loss aggregation {self.agg_mode!r}; known: {', '.join(AGGREGATIONS.names())}")
        if self.norm_length is not None and self.norm_length < 1:
            raise ValueError(f"norm_length must be >= 1 or None, got {self.norm_length}")
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(f"unknown policy loss {self.policy_loss!r}; known: {', '.join(POLICY_LOSSES.names())}")


class PolicyLoss(Protocol):
    def __call__(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        cfg: LossConfig,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")
Aggregation = Callable[..., torch.Tensor]
AGGREGATIONS: Registry[Aggregation] = Registry("loss aggregation")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.bool()
    return torch.where(mask, x, _zero(x)).sum() / mask.sum().clamp(min=1)


def _zero(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=like.dtype, device=like.device)


# --------------------------------------------------------------------------- policy losses


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip with decoupled clip range and optional dual clip.

    Schulman et al. 2017 (arXiv:1707.06347) Eq. 7, L = -min(rho*A, clip(rho, 1-eps, 1+eps)*A)
    with rho = exp(logprobs - old_logprobs); DAPO clip-higher (Yu et al. 2025,
    arXiv:2503.14476, §3.1) uses eps_low = ``clip_low`` and eps_high = ``clip_high``; dual
    clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL",
    arXiv:1912.09729, the dual-clip PPO objective) caps the loss of A < 0 tokens at -c*A.

    Args:
      logprobs: (B, T) current policy log-probs (carries the gradient).
      old_logprobs: (B, T) sampler log-probs.
      advantages: (B, T).
      mask: (B, T) bool, generated tokens.
      cfg: ``clip_low``, ``clip_high``, ``dual_clip``.

    Returns:
      (per-token loss (B, T), 0 off the mask; metrics: clip_frac (either side),
      clip_frac_low, clip_frac_high, dual_clip_frac, approx_kl (mean of old - new),
      ratio_mean), metrics detached, averaged over the mask.
    """
    mask = mask.bool()
    # Sanitise off-mask entries first: padding may hold -inf/NaN, and a NaN that is only
    # masked afterwards still poisons the gradient (0 * NaN).
    advantages = torch.where(mask, advantages, _zero(advantages))
    log_ratio = torch.where(mask, logprobs - old_logprobs, _zero(logprobs))
    log_ratio = log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    clipped = ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    loss1 = -advantages * ratio
    loss2 = -advantages * clipped
    loss = torch.maximum(loss1, loss2)
    metrics_dual = torch.zeros_like(mask)
    if cfg.dual_clip is not None:
        cap = -advantages * cfg.dual_clip
        metrics_dual = (advantages < 0) & (loss > cap)
        loss = torch.where(advantages < 0, torch.minimum(loss, cap), loss)
    loss = torch.where(mask, loss, _zero(loss))
    with torch.no_grad():
        clip_active = loss2 > loss1  # the clipped branch is the one taken
        metrics = {
            "clip_frac": _masked_mean(clip_active.to(ratio.dtype), mask),
            "clip_frac_low": _masked_mean((clip_active & (ratio < 1.0)).to(ratio.dtype), mask),
            "clip_frac_high": _masked_mean((clip_active & (ratio > 1.0)).to(ratio.dtype), mask),
            "dual_clip_frac": _masked_mean(metrics_dual.to(ratio.dtype), mask),
            "approx_kl": _masked_mean(-log_ratio, mask),
            "ratio_mean": _masked_mean(ratio, mask),
        }
    return loss, metrics


@POLICY_LOSSES.register("gspo")
def gspo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv:2507.18071):
    the length-normalised sequence ratio s_i = exp(mean_t log(pi/pi_old)) (§4.1), in its
    GSPO-token form (§4.3) s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)], so per-token
    advantages are allowed; the loss is -min(s*A, clip(s, 1-eps_low, 1+eps_high)*A) with
    the small GSPO clip range (``gspo_clip_low`` 3e-4, ``gspo_clip_high`` 4e-4).

    The value of s_{i,t} equals s_i; its gradient is s_i * grad log pi(y_t). Aggregate with
    ``seq_mean_token_mean`` to reproduce the paper's sequence-level objective.

    Args/returns: as :func:`ppo_clip_loss`; metrics: clip_frac, seq_ratio_mean, approx_kl.
    """
    mask = mask.bool()
    m = mask.to(logprobs.dtype)
    advantages = torch.where(mask, advantages, _zero(advantages))
    log_ratio = torch.where(mask, logprobs - old_logprobs, _zero(logprobs))
    lengths = m.sum(dim=1).clamp(min=1)
    seq_log_ratio = log_ratio.sum(dim=1) / lengths  # (B,)
    safe_logprobs = torch.where(mask, logprobs, _zero(logprobs))
    token_log_ratio = seq_log_ratio.detach().unsqueeze(1) + safe_logprobs - safe_logprobs.detach()
    ratio = token_log_ratio.clamp(max=_LOG_RATIO_CLAMP).exp()
    clipped = ratio.clamp(1.0 - cfg.gspo_clip_low, 1.0 + cfg.gspo_clip_high)
    loss1 = -advantages * ratio
    loss2 = -advantages * clipped
    loss = torch.where(mask, torch.maximum(loss1, loss2), _zero(logprobs))
    with torch.no_grad():
        has_tokens = m.sum(dim=1) > 0
        seq_ratio = seq_log_ratio.exp()
        metrics = {
            "clip_frac": _masked_mean((loss2 > loss1).to(logprobs.dtype), mask),
            "seq_ratio_mean": _masked_mean(seq_ratio, has_tokens),
            "approx_kl": _masked_mean(-log_ratio, mask),
        }
    return loss, metrics


# --------------------------------------------------------------------------- KL, entropy, value


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: KLKind = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled tokens (Schulman 2020,
    "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html).

    With x = log pi_ref(y) - log pi(y): k1 = -x (unbiased, high variance), k2 = x^2 / 2
    (biased, low variance), k3 = exp(x) - 1 - x (unbiased, low variance, always >= 0;
    GRPO's "low-variance KL", Shao et al. 2024 Eq. 4; alias ``"low_var_kl"``).

    Args:
      logprobs, ref_logprobs: (B, T) log-probs of the sampled tokens.
      kind: estimator.

    Returns:
      (B, T) per-token penalty (mask it with ``aggregate``). x is clamped to [-20, 20] so
      k3 stays finite.
    """
    x = (ref_logprobs - logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    if kind == "k1":
        return -x
    if kind == "k2":
        return 0.5 * x * x
    if kind in ("k3", "low_var_kl"):
        return torch.expm1(x) - x
    raise ValueError(f"unknown KL estimator {kind!r}; known: k1, k2, k3, low_var_kl")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the last dimension: H = logsumexp(z) - sum softmax(z) z.

    Args:
      logits: (B, T, V) float.

    Returns:
      (B, T) entropy in nats (aggregate it over the action mask for the entropy bonus).
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None = 0.2,
) -> torch.Tensor:
    """Clipped value loss for the critic (PPO, Schulman et al. 2017; the clipped form
    from OpenAI baselines' ppo2): 0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2).

    Args:
      values: (B, T) current critic values; old_values: (B, T) at rollout time;
      returns: (B, T) targets (``AdvantageOutput.returns``); mask: (B, T) bool.
      clip: c, or None for the plain squared error.

    Returns:
      (B, T) per-token loss, 0 off the mask.
    """
    err = (values - returns) ** 2
    if clip is not None:
        v_clipped = old_values + (values - old_values).clamp(-clip, clip)
        err = torch.maximum(err, (v_clipped - returns) ** 2)
    return torch.where(mask.bool(), 0.5 * err, _zero(err))


# --------------------------------------------------------------------------- aggregation


@AGGREGATIONS.register("token_mean")
def token_mean(loss: torch.Tensor, mask: torch.Tensor, *, norm_length: int | None = None) -> torch.Tensor:
    """Sum over all masked tokens of the batch / their number (DAPO token-level loss,
    Yu et al. 2025, §3.3): long sequences weigh in proportion to their length."""
    return _masked_mean(loss, mask)


@AGGREGATIONS.register("seq_mean_token_mean")
def seq_mean_token_mean(loss: torch.Tensor, mask: torch.Tensor, *, norm_length: int | None = None) -> torch.Tensor:
    """Mean over each sequence's masked tokens, then mean over the sequences that have any
    (GRPO, Shao et al. 2024 Eq. 3; GSPO)."""
    mask = mask.bool()
    count = mask.sum(dim=1)
    per_seq = torch.where(mask, loss, _zero(loss)).sum(dim=1) / count.clamp(min=1)
    has = count > 0
    return torch.where(has, per_seq, _zero(per_seq)).sum() / has.sum().clamp(min=1)


@AGGREGATIONS.register("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(
    loss: torch.Tensor, mask: torch.Tensor, *, norm_length: int | None = None
) -> torch.Tensor:
    """Sum over each sequence's masked tokens divided by a constant length, then mean
    over all B sequences (Dr. GRPO, Liu et al. 2025, arXiv:2503.20783, its loss: no
    per-sequence length normalisation). The constant is ``norm_length`` or T."""
    length = loss.shape[-1] if norm_length is None else norm_length
    return (torch.where(mask.bool(), loss, _zero(loss)).sum(dim=1) / length).mean()


def aggregate(
    loss: torch.Tensor, mask: torch.Tensor, mode: AggMode = "token_mean", *, norm_length: int | None = None
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss over the (B, T) bool ``mask`` to a scalar.

    Modes: ``token_mean`` (DAPO), ``seq_mean_token_mean`` (GRPO/GSPO),
    ``seq_mean_token_sum_norm`` (Dr. GRPO; divides by ``norm_length`` or T).
    """
    return AGGREGATIONS.get(mode)(loss, mask, norm_length=norm_length)
