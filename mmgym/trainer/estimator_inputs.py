"""Per-episode inputs of the estimators that read more than a ``RolloutBatch``:
MatchTIR's turn rewards against each task's gold tool calls, and Durian's difficulty.

Both come from the trajectories, which the batch no longer holds, so ``score`` computes
the per-episode parts once (:func:`attach_estimator_inputs`) and keeps them as (B, ...)
tensors in ``RolloutBatch.extras``, whose rows follow ``select_rows`` (DAPO's filter);
``learn`` turns them into the estimator's ``AdvantageInputs.extra``
(:func:`estimator_extra`), after the old log-probs are final.

- ``matchtir``: the gold calls are ``Trajectory.info["gold_tool_calls"]`` (the env's
  ``MMEnv.gold_tool_calls`` at reset, one list per turn); each turn's reward is
  ``matchtir_turn_rewards_batch`` of the calls it made (column k = ``Turn.index`` k, as in
  ``build_rollout_batch``). An episode without gold calls is skipped (``has_gold`` False:
  the trajectory-level advantage only) and counted, never an error.
- ``durian_grpo``: difficulty = ``combine_difficulty(visual entropy, confidence)`` over the
  batch, the visual entropy of the task's first image recorded at reset by the rollout
  (``RolloutSettings.visual_entropy``; the images themselves are not kept) and the
  confidence the mean log-prob of the episode's sampled tokens (``old_logprobs``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mmgym.algos import MatchTIRConfig, combine_difficulty, difficulty_bins, matchtir_turn_rewards_batch
from mmgym.core import RolloutBatch, ToolCall, Trajectory
from mmgym.trainer.config import AlgoSection, DurianSection

__all__ = ["attach_estimator_inputs", "estimator_extra", "gold_calls", "calls_per_turn", "matchtir_inputs",
           "durian_difficulty", "mean_token_logprob"]

MATCHTIR_REWARDS = "matchtir_turn_rewards"  # (B, K) float, the estimator's extra key too
HAS_GOLD = "has_gold"  # (B,) bool
VISUAL_ENTROPY = "visual_entropy"  # (B,) float64, NaN: no first image; also the Trajectory.info key


def gold_calls(traj: Trajectory) -> list[Mapping[str, Any]] | None:
    """The episode's gold calls, flattened over turns (MatchTIR matches all of an episode's
    calls at once), from ``info["gold_tool_calls"]``; None when absent, empty or not a list
    of lists of ``{"name", "arguments"}`` mappings (then the episode is skipped, not an error)."""
    turns = traj.info.get("gold_tool_calls")
    if not isinstance(turns, (list, tuple)) or not all(isinstance(t, (list, tuple)) for t in turns):
        return None
    flat = [c for t in turns for c in t]
    if not flat or not all(isinstance(c, Mapping) and isinstance(c.get("name"), str) for c in flat):
        return None
    return flat


def calls_per_turn(traj: Trajectory, num_turns: int) -> list[list[ToolCall]]:
    """``num_turns`` lists: entry k holds the calls of the turn with ``Turn.index`` k (a turn
    without calls, or past the episode's end, is empty)."""
    out: list[list[ToolCall]] = [[] for _ in range(num_turns)]
    for turn in traj.turns:
        if 0 <= turn.index < num_turns:
            out[turn.index] = list(turn.tool_calls)
    return out


def matchtir_inputs(trajs: Sequence[Trajectory], num_turns: int, cfg: MatchTIRConfig) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """MatchTIR turn rewards of B episodes: ``({MATCHTIR_REWARDS: (B, K), HAS_GOLD: (B,)}``,
    metrics ``matchtir/skipped`` (episodes without gold calls) and ``matchtir/turn_reward_mean``
    (mean reward over the real turns of the episodes with gold; 0 when there is none))."""
    gold = [gold_calls(t) for t in trajs]
    turn_calls = [calls_per_turn(t, num_turns) for t in trajs]
    rewards, has_gold, m = matchtir_turn_rewards_batch(turn_calls, gold, num_turns=num_turns, assignment=cfg.assignment,
                                                       reg=cfg.sinkhorn_reg, iters=cfg.sinkhorn_iters)
    real = torch.zeros(len(trajs), num_turns, dtype=torch.bool)
    for b, t in enumerate(trajs):
        real[b, [k.index for k in t.turns if 0 <= k.index < num_turns]] = True
    real &= has_gold.unsqueeze(1)
    mean = float(rewards[real].mean()) if bool(real.any()) else 0.0
    return {MATCHTIR_REWARDS: rewards, HAS_GOLD: has_gold}, {"matchtir/skipped": m["matchtir_skipped"], "matchtir/turn_reward_mean": mean}


def attach_estimator_inputs(batch: RolloutBatch, trajs: Sequence[Trajectory], algo: AlgoSection) -> dict[str, float]:
    """Store what the configured estimator reads from the episodes ``trajs`` (the batch's
    rows, in order) in ``batch.extras``; return its metrics (``{}`` for other estimators)."""
    name = algo.estimator.estimator
    if name == "matchtir":
        extras, metrics = matchtir_inputs(trajs, int(batch.turn_rewards.shape[1]), algo.matchtir)
        batch.extras.update(extras)
        return metrics
    if name == "durian_grpo":
        entropy = [t.info.get(VISUAL_ENTROPY) for t in trajs]
        batch.extras[VISUAL_ENTROPY] = torch.tensor([math.nan if e is None else float(e) for e in entropy], dtype=torch.float64)
    return {}


def mean_token_logprob(logprobs: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean log-prob of each row's sampled tokens (``action_mask``) over (B, T)
    ``logprobs``; tokens without a finite log-prob (vLLM's NaN) are left out; 0 for none."""
    mask = action_mask.bool() & torch.isfinite(logprobs)
    total = torch.where(mask, logprobs, torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)).sum(1)
    return total / mask.sum(1).clamp(min=1)


def durian_difficulty(visual: torch.Tensor, confidence: torch.Tensor, group_ids: torch.Tensor,
                      cfg: DurianSection) -> tuple[torch.Tensor, dict[str, float]]:
    """(B,) difficulty ``combine_difficulty(visual, confidence)`` for ``durian_grpo``.

    Args:
      visual: (B,) visual entropy, NaN for an episode without a first image (it takes
        the batch's mean, so its visual term is 0).  confidence: (B,) mean token log-prob.
      group_ids: (B,) long, for the logged bin count.  cfg: ``algo.durian``.

    Returns:
      difficulty and metrics ``durian/bins`` (bins holding at least one prompt group under
      ``cfg``'s binning), ``durian/difficulty_std`` and ``durian/no_image``.
    """
    visual = visual.to(torch.float64)
    missing = torch.isnan(visual)
    fill = visual[~missing].mean() if bool((~missing).any()) else visual.new_zeros(())
    visual = torch.where(missing, fill, visual)
    difficulty = combine_difficulty(visual, confidence.to(torch.float64), visual_weight=cfg.visual_weight,
                                    confidence_weight=cfg.confidence_weight)
    bins = difficulty_bins(difficulty, group_ids.to(difficulty.device), num_bins=cfg.num_bins, binning=cfg.binning, edges=cfg.edges)
    std = float(difficulty.std()) if difficulty.numel() > 1 else 0.0
    return difficulty, {"durian/bins": float(bins.unique().numel()), "durian/difficulty_std": std,
                        "durian/no_image": float(missing.sum())}


def estimator_extra(batch: RolloutBatch, algo: AlgoSection) -> tuple[dict[str, torch.Tensor] | None, dict[str, float]]:
    """``AdvantageInputs.extra`` for the configured estimator from what
    :func:`attach_estimator_inputs` stored (``matchtir``: turn rewards and ``has_gold``;
    ``durian_grpo``: the difficulty, from the batch's final old log-probs), and its metrics;
    ``(None, {})`` for the estimators that read nothing extra."""
    name = algo.estimator.estimator
    if name == "matchtir":
        return {MATCHTIR_REWARDS: batch.extras[MATCHTIR_REWARDS], HAS_GOLD: batch.extras[HAS_GOLD]}, {}
    if name == "durian_grpo":
        confidence = mean_token_logprob(batch.old_logprobs, batch.action_mask)
        visual = batch.extras[VISUAL_ENTROPY].to(confidence.device)
        difficulty, metrics = durian_difficulty(visual, confidence, batch.group_ids, algo.durian)
        return {"difficulty": difficulty}, metrics
    return None, {}
