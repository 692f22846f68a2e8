"""Per-token weights multiplied into the policy-gradient term.

Every weighting has ONE signature (registry ``TOKEN_WEIGHTS``)::

    weights, metrics = TOKEN_WEIGHTS.get(cfg.name)(inputs, cfg)
    advantages = advantages * weights          # before the policy loss (B, T)

``inputs`` is a :class:`TokenWeightInputs`, ``cfg`` a :class:`TokenWeightConfig`;
``weights`` is (B, T), detached, 0 off the action mask; ``metrics`` is a dict of detached
scalar tensors (``weight_mean``, ``extra_forwards`` = model forwards beyond the usual
policy/old/reference ones that this weighting needs, and method-specific ones).

Names: ``none`` (all ones), ``vppo`` (visual dependency, needs a forward without the image),
``tor`` (perception / reasoning tokens), ``delta_logp`` (signed log-prob shift from the
reference: tokens the policy pushed up get more weight), ``fipo`` (discounted
future log-prob shift). Multiplying the advantage is the same as multiplying the
per-token surrogate, so the weights act on the policy-gradient term only (KL and entropy
terms are untouched).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mmgym.algos.advantages import dense_ids, discounted_returns
from mmgym.core.registry import Registry

__all__ = [
    "TOKEN_WEIGHTS",
    "TokenWeightConfig",
    "TokenWeightInputs",
    "TokenWeighting",
    "compute_token_weights",
    "delta_logp_weights",
    "fipo_weights",
    "no_weights",
    "tor_weights",
    "visual_dependency",
    "vppo_weights",
]


@dataclass(slots=True)
class TokenWeightInputs:
    """Tensors a weighting may read; each weighting says which it needs.

    Fields (shapes):
      action_mask (B, T) bool: tokens the policy generated (weights live here only).
      logprobs (B, T) float, optional: current-policy log-probs of the sampled tokens
        (detached here; ``fipo``).
      old_logprobs (B, T) float, optional: sampler log-probs (``fipo``).
      ref_logprobs (B, T) float, optional: reference-policy log-probs (``delta_logp``).
      logits_with_image (B, T, V) float, optional: policy logits (or log-softmax) at each
        position with the images in the context (``vppo``; the training forward's logits).
      logits_without_image (B, T, V) float, optional: the same positions with the images
        removed or blacked out (``vppo``; one extra no-grad forward).
      perception_mask (B, T) bool, optional: perception tokens (``tor``), e.g. the tokens
        inside ``<look>``/description tags or of tool calls that look at the image.
      group_ids (B,) long, optional: prompt groups (``vppo`` normalises trajectory
        dependency within a group; the whole batch when absent).
    """

    action_mask: torch.Tensor
    logprobs: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    logits_with_image: torch.Tensor | None = None
    logits_without_image: torch.Tensor | None = None
    perception_mask: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.action_mask.dim() != 2:
            raise ValueError(f"TokenWeightInputs.action_mask must be (B, T), got {tuple(self.action_mask.shape)}")
        b, t = self.action_mask.shape
        for name in ("logprobs", "old_logprobs", "ref_logprobs", "perception_mask"):
            v = getattr(self, name)
            if v is not None and tuple(v.shape) != (b, t):
                raise ValueError(f"TokenWeightInputs.{name} has shape {tuple(v.shape)}, expected (B, T) = {(b, t)}")
        for name in ("logits_with_image", "logits_without_image"):
            v = getattr(self, name)
            if v is not None and (v.dim() != 3 or tuple(v.shape[:2]) != (b, t)):
                raise ValueError(f"TokenWeightInputs.{name} has shape {tuple(v.shape)}, expected (B, T, V) with (B, T) = {(b, t)}")
        if self.group_ids is not None and tuple(self.group_ids.shape) != (b,):
            raise ValueError(f"TokenWeightInputs.group_ids has shape {tuple(self.group_ids.shape)}, expected ({b},)")


@dataclass(frozen=True)
class TokenWeightConfig:
    """Every token-weighting hyperparameter."""

    name: str = "none"
    """Registered weighting: none, vppo, tor, delta_logp, fipo."""
    vppo_top_frac: float = 0.4
    """VPPO token-level gradient filtering: fraction k of each trajectory's generated
    tokens (highest visual dependency) that keep a gradient."""
    vppo_min_scale: float = 0.9
    """VPPO trajectory-level advantage shaping: the least visually dependent trajectory of
    a group is scaled by this, the most dependent by ``vppo_max_scale``."""
    vppo_max_scale: float = 1.0
    """Upper end of the VPPO trajectory scale."""
    tor_perception_weight: float = 2.0
    """ToR weight of perception tokens."""
    tor_reasoning_weight: float = 1.0
    """ToR weight of the other (reasoning) generated tokens."""
    tor_normalize: bool = True
    """Rescale ToR weights so each trajectory's mean weight is 1 (reweights tokens
    without changing the trajectory's total step size)."""
    delta_alpha: float = 1.0
    """Sharpness of the delta_logp weight exp(alpha * delta)."""
    delta_min: float = 0.5
    """Lower clip of the delta_logp weight."""
    delta_max: float = 2.0
    """Upper clip of the delta_logp weight."""
    fipo_decay_rate: float = 32.0
    """FIPO half-life in tokens: gamma = 2^(-1 / decay_rate) (FIPO default 32)."""
    fipo_clip: float = 0.2
    """FIPO influence clip: weights in [1 - c, 1 + c] (or [1, 1 + c] when high-only)."""
    fipo_clip_high_only: bool = True
    """FIPO: only ever increase a token's weight (FIPO default)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.vppo_top_frac <= 1.0:
            raise ValueError(f"vppo_top_frac must lie in (0, 1] (VPPO keeps the top k of tokens), got {self.vppo_top_frac}")
        if not 0.0 <= self.vppo_min_scale <= self.vppo_max_scale:
            raise ValueError(
                f"need 0 <= vppo_min_scale <= vppo_max_scale, got {self.vppo_min_scale}, {self.vppo_max_scale}"
            )
        if self.tor_perception_weight < 0 or self.tor_reasoning_weight < 0:
            raise ValueError("tor_perception_weight and tor_reasoning_weight must be >= 0")
        if not 0.0 <= self.delta_min <= self.delta_max:
            raise ValueError(f"need 0 <= delta_min <= delta_max, got {self.delta_min}, {self.delta_max}")
        if not self.fipo_decay_rate > 0:
            raise ValueError(f"fipo_decay_rate must be > 0, got {self.fipo_decay_rate}")
        if not 0.0 <= self.fipo_clip < 1.0:
            raise ValueError(f"fipo_clip must lie in [0, 1), got {self.fipo_clip}")
        if self.name not in TOKEN_WEIGHTS:
            raise ValueError(f"unknown token weighting {self.name!r}; known: {', '.join(TOKEN_WEIGHTS.names())}")


TokenWeighting = Callable[[TokenWeightInputs, TokenWeightConfig], tuple[torch.Tensor, dict[str, torch.Tensor]]]
TOKEN_WEIGHTS: Registry[TokenWeighting] = Registry("token weighting")


def compute_token_weights(inputs: TokenWeightInputs, cfg: TokenWeightConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run the weighting named by ``cfg.name``."""
    return TOKEN_WEIGHTS.get(cfg.name)(inputs, cfg)


def _need(inputs: TokenWeightInputs, field: str, method: str, how: str) -> torch.Tensor:
    v = getattr(inputs, field)
    if v is None:
        raise ValueError(f"token weighting {method!r} needs TokenWeightInputs.{field}: {how}")
    return v


def _float_mask(mask: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    dtype = like.dtype if like is not None and like.is_floating_point() else torch.float32
    return mask.bool().to(dtype)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.bool()
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum() / mask.sum().clamp(min=1)


def _metrics(weights: torch.Tensor, mask: torch.Tensor, extra_forwards: int, **more: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = {
            "weight_mean": _masked_mean(weights, mask),
            "weight_max": torch.where(mask.bool(), weights, weights.new_zeros(())).amax()
            if weights.numel()
            else weights.new_zeros(()),
            "extra_forwards": torch.tensor(float(extra_forwards)),
        }
        out.update({k: v.detach() for k, v in more.items()})
    return out


# --------------------------------------------------------------------------- none


@TOKEN_WEIGHTS.register("none")
def no_weights(inputs: TokenWeightInputs, cfg: TokenWeightConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weight 1 on every generated token, 0 elsewhere (the default; no extra forward)."""
    w = _float_mask(inputs.action_mask, inputs.logprobs)
    return w, _metrics(w, inputs.action_mask, 0)


# --------------------------------------------------------------------------- VPPO


def visual_dependency(logits_with_image: torch.Tensor, logits_without_image: torch.Tensor) -> torch.Tensor:
    """Token visual dependency S_t = KL(pi(. | s_t, I) || pi(. | s_t, I_masked)) over the
    vocabulary (VPPO: Huang et al. 2025, "Spotlight on Token Perception for Multimodal
    Reinforcement Learning", arXiv:2510.09285, the token-perception score).

    Args:
      logits_with_image, logits_without_image: (B, T, V) logits or log-probabilities
        (log-softmax is applied, which leaves log-probabilities unchanged); -inf marks a
        forbidden token (a term with p = 0 counts 0, the 0 log 0 = 0 convention).

    Returns:
      (B, T) float >= 0, detached (computed in float32 or wider).
    """
    with torch.no_grad():
        a = logits_with_image.detach()
        b = logits_without_image.detach()
        dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
        lp = torch.log_softmax(a.to(dtype), dim=-1)
        lq = torch.log_softmax(b.to(dtype), dim=-1)
        # -inf - -inf is nan: tokens both distributions forbid (sampler masks) add nothing
        terms = torch.where(lp > -torch.inf, lp.exp() * (lp - lq), torch.zeros((), dtype=dtype, device=lp.device))
        return terms.sum(dim=-1).clamp(min=0.0)


@TOKEN_WEIGHTS.register("vppo")
def vppo_weights(inputs: TokenWeightInputs, cfg: TokenWeightConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VPPO (Huang et al. 2025, arXiv:2510.09285): trajectory-level advantage shaping times
    token-level gradient filtering, both from the visual dependency S_t.

    - S_t = :func:`visual_dependency` on generated tokens; trajectory dependency
      Sbar_i = mean of S_t over trajectory i's generated tokens.
    - Shaping: alpha_i = min_scale + (max_scale - min_scale) * (Sbar_i - min_G) / (max_G - min_G),
      min/max over the trajectory's group (``group_ids``; the batch without them);
      a group whose Sbar are all equal gets alpha = max_scale.
    - Filtering: m_t = 1 for the ceil(k * n_i) generated tokens of trajectory i with the
      largest S_t (ties broken by position), 0 for the rest.
    - w_t = alpha_i * m_t.

    Needs ``logits_with_image`` (the training forward) and ``logits_without_image``: ONE
    extra no-grad forward of the policy with the images masked (``extra_forwards`` = 1).
    Metrics: ``visual_dependency_mean``, ``kept_frac``.
    """
    how = "pass the policy logits with images and from one extra no-grad forward with the images masked"
    with_img = _need(inputs, "logits_with_image", "vppo", how)
    without = _need(inputs, "logits_without_image", "vppo", how)
    mask = inputs.action_mask.bool()
    dep = visual_dependency(with_img, without)
    zero = torch.zeros((), dtype=dep.dtype, device=dep.device)
    dep = torch.where(mask, dep, zero)
    count = mask.sum(dim=1)
    seq_dep = dep.sum(dim=1) / count.clamp(min=1).to(dep.dtype)

    # Trajectory scale: min-max normalise Sbar within each group.
    if inputs.group_ids is None:
        seg = torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
        n = 1
    else:
        seg, n = dense_ids(inputs.group_ids)
    has = count > 0
    inf = torch.tensor(torch.inf, dtype=dep.dtype, device=dep.device)
    lo = torch.full((n,), torch.inf, dtype=dep.dtype, device=dep.device).scatter_reduce(
        0, seg, torch.where(has, seq_dep, inf), reduce="amin", include_self=True
    )
    hi = torch.full((n,), -torch.inf, dtype=dep.dtype, device=dep.device).scatter_reduce(
        0, seg, torch.where(has, seq_dep, -inf), reduce="amax", include_self=True
    )
    lo_i, hi_i = lo.index_select(0, seg), hi.index_select(0, seg)
    span = hi_i - lo_i
    flat = ~(span > 0)
    frac = torch.where(flat, torch.ones_like(seq_dep), (seq_dep - lo_i) / torch.where(flat, torch.ones_like(span), span))
    alpha = cfg.vppo_min_scale + (cfg.vppo_max_scale - cfg.vppo_min_scale) * frac

    # Token filter: rank generated tokens by dependency (stable: earlier position wins ties).
    keep_n = torch.ceil(count.to(torch.float64) * cfg.vppo_top_frac).to(torch.long)
    score = torch.where(mask, dep, -inf)
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    kept = mask & (rank < keep_n.unsqueeze(1))
    w = torch.where(kept, alpha.unsqueeze(1), zero)
    out_dtype = inputs.logprobs.dtype if inputs.logprobs is not None else dep.dtype
    w = w.to(out_dtype)
    return w, _metrics(
        w,
        mask,
        1,
        visual_dependency_mean=_masked_mean(dep, mask),
        kept_frac=kept.sum().to(dep.dtype) / mask.sum().clamp(min=1).to(dep.dtype),
    )


# --------------------------------------------------------------------------- ToR


@TOKEN_WEIGHTS.register("tor")
def tor_weights(inputs: TokenWeightInputs, cfg: TokenWeightConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Perception / reasoning token reweighting (ToR), formula written out:

        w_t = p if perception_mask[t] else r        on generated tokens,
        w_t <- w_t * n_i / sum_{t in i} w_t          if ``tor_normalize`` (mean 1 per trajectory)

    with p = ``tor_perception_weight``, r = ``tor_reasoning_weight``. A trajectory whose
    weights sum to 0 keeps weight 0. Needs ``perception_mask`` (from the chat rendering:
    which generated tokens are perception tokens); no extra forward.
    Metrics: ``perception_frac``.
    """
    perc = _need(
        inputs,
        "perception_mask",
        "tor",
        "mark perception tokens (e.g. inside perception tags, or tool calls that look at the image) as a (B, T) bool mask",
    ).bool()
    mask = inputs.action_mask.bool()
    dtype = inputs.logprobs.dtype if inputs.logprobs is not None else torch.float32
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    w = torch.where(
        perc,
        torch.tensor(cfg.tor_perception_weight, dtype=dtype, device=mask.device),
        torch.tensor(cfg.tor_reasoning_weight, dtype=dtype, device=mask.device),
    )
    w = torch.where(mask, w, zero)
    if cfg.tor_normalize:
        total = w.sum(dim=1, keepdim=True)
        n = mask.sum(dim=1, keepdim=True).to(dtype)
        w = torch.where(total > 0, w * n / torch.where(total > 0, total, torch.ones_like(total)), zero)
    return w, _metrics(w, mask, 0, perception_frac=_masked_mean((perc & mask).to(dtype), mask))


# --------------------------------------------------------------------------- delta log p


@TOKEN_WEIGHTS.register("delta_logp")
def delta_logp_weights(inputs: TokenWeightInputs, cfg: TokenWeightConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Low-probability emphasis from the signed log-prob shift to the reference (after
    Huang et al. 2026, "On the Direction of RLVR Updates for LLM Reasoning",
    arXiv:2603.22117: the reasoning-critical tokens are those with a large signed
    delta = log pi(y_t) - log pi_ref(y_t), and they are the reference's low-probability
    tokens; their exact training-time weighting is not reproduced here). Written out:

        delta_t = log pi(y_t) - log pi_ref(y_t)   (detached)
        w_t     = clip(exp(alpha * delta_t), w_min, w_max)

    Tokens the policy has pushed up from an unlikely reference choice get up to ``w_max``,
    tokens it is pushing down get down to ``w_min``, unchanged tokens 1. Needs
    ``logprobs`` and ``ref_logprobs`` (the KL term's reference forward; no extra forward).
    Metrics: ``delta_logp_mean``.
    """
    how = "pass the current and reference log-probs of the sampled tokens (the reference forward of the KL term)"
    lp = _need(inputs, "logprobs", "delta_logp", how).detach()
    ref = _need(inputs, "ref_logprobs", "delta_logp", how).detach().to(lp.dtype)
    mask = inputs.action_mask.bool()
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    delta = torch.where(mask, lp - ref, zero)
    w = torch.exp((cfg.delta_alpha * delta).clamp(-30.0, 30.0)).clamp(cfg.delta_min, cfg.delta_max)
    w = torch.where(mask, w, zero)
    return w, _metrics(w, mask, 0, delta_logp_mean=_masked_mean(delta, mask))


# --------------------------------------------------------------------------- FIPO


@TOKEN_WEIGHTS.register("fipo")
def fipo_weights(inputs: TokenWeightInputs, cfg: TokenWeightConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """FIPO (Ma et al. 2026, "FIPO: Eliciting Deep Reasoning with Future-KL Influenced
    Policy Optimization", arXiv:2603.19835), the future-KL influence weight:

        delta_k    = log pi(y_k) - log pi_old(y_k)                 (detached)
        FutureKL_t = sum_{k >= t} gamma^(k - t) M_k delta_k,  gamma = 2^(-1 / decay_rate)
        w_t        = clip(exp(FutureKL_t), 1 - c, 1 + c)   ([1, 1 + c] when high-only)

    The sum runs over the trajectory's generated tokens (env tokens of later turns are
    skipped, not counted in k - t). At the first PPO epoch pi = pi_old and w = 1. Needs
    ``logprobs`` (the training forward) and ``old_logprobs``; no extra forward.
    Metrics: ``future_kl_mean``.
    """
    how = "pass the current policy's log-probs and the sampler's old_logprobs of the sampled tokens"
    lp = _need(inputs, "logprobs", "fipo", how).detach()
    old = _need(inputs, "old_logprobs", "fipo", how).detach().to(lp.dtype)
    mask = inputs.action_mask.bool()
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    delta = torch.where(mask, lp - old, zero)
    gamma = math.pow(2.0, -1.0 / cfg.fipo_decay_rate)
    future = discounted_returns(delta, mask, gamma=gamma)
    low = 1.0 if cfg.fipo_clip_high_only else 1.0 - cfg.fipo_clip
    w = torch.exp(future.clamp(max=30.0)).clamp(low, 1.0 + cfg.fipo_clip)
    w = torch.where(mask, w, zero)
    return w, _metrics(w, mask, 0, future_kl_mean=_masked_mean(future, mask))

