"""Difficulty-aware normalisation (Durian): GRPO whose std is shared by every prompt
group of similar difficulty instead of being taken per prompt group.

Per-prompt GRPO divides by the std of G rewards, a noisy number when G is small and 0
when a group is nearly solved or nearly failed, which blows up the few non-zero
advantages of easy and hard prompts. Durian regroups the prompt groups by difficulty
(visual entropy of the image, the policy's confidence on the task) into bins and uses
one std per bin. The mean stays per prompt group, so the baseline is still the group's:

    A_i = (r_i - mean_{G(i)}) / (sigma_{bin(i)} + eps)

with ``std_mode="pooled"`` (default) the pooled within-group std of the bin,
    sigma_bin^2 = sum_{i in bin} (r_i - mean_{G(i)})^2 / sum_{g in bin} (n_g - 1),
(equal to the group's own std when a bin holds one group, so one group per bin is plain
GRPO) and with ``std_mode="total"`` the unbiased std of all rewards in the bin.

Difficulty is one number per trajectory in ``inputs.extra["difficulty"]`` (B,); a prompt
group's difficulty is the mean over its trajectories, so a group never splits across
bins. Build it with :func:`visual_entropy` and :func:`combine_difficulty` (or any
score where larger = harder). Registered estimator: ``"durian_grpo"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from mmgym.algos.advantages import (
    ESTIMATORS,
    AdvantageInputs,
    AdvantageOutput,
    EstimatorConfig,
    dense_ids,
    group_normalize,
)
from mmgym.core.image_stats import visual_entropy

__all__ = [
    "DurianConfig",
    "DurianEstimatorConfig",
    "combine_difficulty",
    "difficulty_bins",
    "durian_normalize",
    "visual_entropy",
]


@dataclass(frozen=True)
class DurianConfig:
    """Difficulty binning for ``durian_grpo``."""

    num_bins: int = 4
    """Number of difficulty bins (ignored when ``edges`` is given)."""
    binning: Literal["quantile", "uniform"] = "quantile"
    """``quantile``: bins holding about equally many prompt groups; ``uniform``: equal-width
    bins between the batch's smallest and largest group difficulty."""
    edges: tuple[float, ...] | None = None
    """Fixed increasing inner bin edges (``len(edges) + 1`` bins); overrides ``num_bins``
    and ``binning`` (stable across batches)."""
    std_mode: Literal["pooled", "total"] = "pooled"
    """``pooled`` within-group std of the bin, or the ``total`` std of the bin's rewards."""

    def __post_init__(self) -> None:
        if self.num_bins < 1:
            raise ValueError(f"DurianConfig.num_bins must be >= 1, got {self.num_bins}")
        if self.binning not in ("quantile", "uniform"):
            raise ValueError(f"DurianConfig.binning must be 'quantile' or 'uniform', got {self.binning!r}")
        if self.std_mode not in ("pooled", "total"):
            raise ValueError(f"DurianConfig.std_mode must be 'pooled' or 'total', got {self.std_mode!r}")
        if self.edges is not None:
            e = list(self.edges)
            if any(b <= a for a, b in zip(e, e[1:])):
                raise ValueError(f"DurianConfig.edges must be strictly increasing, got {self.edges}")


@dataclass(frozen=True)
class DurianEstimatorConfig(EstimatorConfig):
    """``EstimatorConfig`` carrying a :class:`DurianConfig` as ``cfg.durian`` (any
    ``EstimatorConfig`` without one uses the defaults)."""

    estimator: str = "durian_grpo"
    durian: DurianConfig = field(default_factory=DurianConfig)


def _durian_cfg(cfg: EstimatorConfig) -> DurianConfig:
    sub = getattr(cfg, "durian", None)
    if sub is None:
        return DurianConfig()
    if not isinstance(sub, DurianConfig):
        raise TypeError(f"cfg.durian must be a DurianConfig, got {type(sub).__name__}; use DurianEstimatorConfig(durian=...)")
    return sub


# --------------------------------------------------------------------------- difficulty


def combine_difficulty(
    visual: torch.Tensor,
    confidence: torch.Tensor,
    *,
    visual_weight: float = 1.0,
    confidence_weight: float = 1.0,
) -> torch.Tensor:
    """One difficulty score from visual entropy (higher = harder) and policy confidence
    (higher = easier, e.g. the group's pass rate or mean token probability):

        d = visual_weight * z(visual) - confidence_weight * z(confidence)

    with z the z-score over the batch (a constant column contributes 0).

    Args:
      visual: (B,) float.  confidence: (B,) float.

    Returns:
      (B,) float difficulty for ``inputs.extra["difficulty"]``.
    """

    def z(x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64) if not x.is_floating_point() else x
        if x.numel() < 2:
            return torch.zeros_like(x)
        sd = x.std()
        return torch.where(sd > 0, (x - x.mean()) / sd.clamp(min=torch.finfo(x.dtype).tiny), torch.zeros_like(x))

    return visual_weight * z(visual) - confidence_weight * z(confidence.to(visual.dtype))


def difficulty_bins(
    difficulty: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    num_bins: int = 4,
    binning: Literal["quantile", "uniform"] = "quantile",
    edges: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """Bin index of each trajectory, by its prompt group's mean difficulty.

    ``quantile``: inner edges at the i/num_bins quantiles of the group difficulties (so
    groups of equal difficulty share a bin); ``uniform``: equal-width edges between the
    smallest and largest group difficulty; ``edges``: fixed inner edges. A difficulty equal
    to an edge falls in the lower bin.

    Args:
      difficulty: (B,) float.  group_ids: (B,) long.

    Returns:
      (B,) long bin ids in ``[0, num_bins)`` (``[0, len(edges)]`` with ``edges``).
    """
    if difficulty.shape != group_ids.shape or difficulty.dim() != 1:
        raise ValueError(
            f"difficulty and group_ids must both be (B,), got {tuple(difficulty.shape)} and {tuple(group_ids.shape)}"
        )
    d = difficulty.to(torch.float64)
    if not torch.isfinite(d).all():
        raise ValueError("difficulty holds NaN or inf; give every trajectory a finite difficulty score")
    seg, n = dense_ids(group_ids)
    count = torch.zeros(n, dtype=d.dtype, device=d.device).index_add(0, seg, torch.ones_like(d))
    group_d = torch.zeros(n, dtype=d.dtype, device=d.device).index_add(0, seg, d) / count
    if edges is not None:
        inner = torch.tensor(edges, dtype=d.dtype, device=d.device)
    elif num_bins == 1:
        inner = d.new_zeros(0)
    elif binning == "quantile":
        q = torch.arange(1, num_bins, dtype=d.dtype, device=d.device) / num_bins
        inner = torch.quantile(group_d, q)
    elif binning == "uniform":
        lo, hi = group_d.min(), group_d.max()
        inner = lo + (hi - lo) * torch.arange(1, num_bins, dtype=d.dtype, device=d.device) / num_bins
    else:
        raise ValueError(f"unknown binning {binning!r}; known: quantile, uniform")
    group_bin = torch.bucketize(group_d, inner, right=False)
    return group_bin.index_select(0, seg)


def durian_normalize(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    bins: torch.Tensor,
    *,
    std_mode: Literal["pooled", "total"] = "pooled",
    eps: float = 1e-6,
) -> torch.Tensor:
    """(r_i - mean_{G(i)}) / (sigma_{bin(i)} + eps), sigma as in the module docstring.

    Args:
      scores: (B,) float rewards.  group_ids: (B,) long.  bins: (B,) long bin per trajectory.
      std_mode: ``pooled`` or ``total``.  eps: added to sigma.

    Returns:
      (B,) float; exactly 0 for trajectories whose group's rewards are all equal.
    """
    seg, n = dense_ids(group_ids)
    centred = group_normalize(scores, seg, n, std=False)  # exact 0 for equal groups
    bin_seg, nb = dense_ids(bins)
    dtype, device = scores.dtype, scores.device
    if std_mode == "pooled":
        sq = torch.zeros(nb, dtype=dtype, device=device).index_add(0, bin_seg, centred * centred)
        # degrees of freedom: sum over the bin's groups of (n_g - 1) = #trajectories - #groups
        members = torch.zeros(nb, dtype=dtype, device=device).index_add(0, bin_seg, torch.ones_like(scores))
        groups = torch.zeros(nb, dtype=dtype, device=device).index_add(
            0, bin_seg[_first_of_group(seg, n)], torch.ones(n, dtype=dtype, device=device)
        )
        sd = (sq / (members - groups).clamp(min=1)).sqrt()
    elif std_mode == "total":
        total_centred = group_normalize(scores, bin_seg, nb, std=False)
        count = torch.zeros(nb, dtype=dtype, device=device).index_add(0, bin_seg, torch.ones_like(scores))
        sq = torch.zeros(nb, dtype=dtype, device=device).index_add(0, bin_seg, total_centred * total_centred)
        sd = (sq / (count - 1).clamp(min=1)).sqrt()
    else:
        raise ValueError(f"unknown std_mode {std_mode!r}; known: pooled, total")
    return centred / (sd.index_select(0, bin_seg) + eps)


def _first_of_group(seg: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) index of one trajectory of each dense group (the first)."""
    pos = torch.arange(seg.shape[0], device=seg.device)
    big = torch.full((n,), seg.shape[0], dtype=torch.long, device=seg.device)
    return big.scatter_reduce(0, seg, pos, reduce="amin", include_self=True)


@ESTIMATORS.register("durian_grpo")
def durian_grpo(inputs: AdvantageInputs, cfg: EstimatorConfig) -> AdvantageOutput:
    """Durian GRPO: group mean, difficulty-bin std (module docstring).

    Reads ``inputs.extra["difficulty"]`` (B,) float (larger = harder), ``inputs.outcome``
    (B,), ``inputs.group_ids`` and ``cfg.durian`` (a :class:`DurianConfig`). Trajectories
    of one prompt group must share a bin, which holds by construction (group-mean
    difficulty). Returns (B, T): the value on every generated token.
    """
    dc = _durian_cfg(cfg)
    extra = inputs.extra or {}
    difficulty = extra.get("difficulty")
    if difficulty is None:
        raise ValueError(
            "advantage estimator 'durian_grpo' needs inputs.extra['difficulty'] (B,) float, larger = harder "
            "(e.g. combine_difficulty(visual_entropy per image, group pass rate)); or use 'grpo'"
        )
    bins = difficulty_bins(
        difficulty,
        inputs.group_ids,
        num_bins=dc.num_bins,
        binning=dc.binning,
        edges=dc.edges,
    )
    adv = durian_normalize(inputs.outcome, inputs.group_ids, bins, std_mode=dc.std_mode, eps=cfg.eps)
    zero = torch.zeros((), dtype=adv.dtype, device=adv.device)
    return AdvantageOutput(torch.where(inputs.action_mask, adv.unsqueeze(1), zero))
