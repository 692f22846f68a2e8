"""MatchTIR: per-tool-call rewards by bipartite matching against gold calls, and the
dual-level (trajectory + turn) advantage ("MatchTIR: Fine-Grained Supervision for
Tool-Integrated Reasoning via Bipartite Matching"; facts in shared/REFERENCES.md).

Rewards (computed once per trajectory by the trainer's score step, plain Python/numpy):

- similarity of a predicted call p to a gold call g (0 if the names differ):
      sim(p, g) = [1 + IoU(keys(p), keys(g)) + #{k in keys(g): p[k] == g[k]}] / (2 + |keys(g)|)
  so a perfect call scores 1 (two calls without arguments: (1 + 1 + 0) / 2);
- assignment of the trajectory's P predicted calls to its G gold calls:
  ``"hard"``: one-to-one, maximising total similarity (Hungarian / linear-sum assignment);
  each call scores the similarity of its partner, unmatched calls 0;
  ``"soft"``: entropic optimal transport (Sinkhorn, reg 0.1) on the square matrix padded
  with zero-similarity dummies, each call scoring sum_g plan[p, g] * sim[p, g] (rows of the
  plan sum to 1; as reg -> 0 this tends to the hard assignment);
- turn reward = mean over the turn's calls (a turn without calls scores 0).

Gold calls missing for a task: :func:`matchtir_turn_rewards_batch` marks the trajectory
``has_gold = False`` and counts it in ``metrics["matchtir_skipped"]``; the estimator then
gives it the trajectory-level advantage only. Nothing raises.

Advantage (registered estimator ``"matchtir"``), per trajectory i and turn k:
      A_traj_i = (R_i - mean_G) / (std_G + eps)          over the prompt group, R = outcome
      R_ik = sum_{j >= k} gamma^(j-k) r_ij                r = MatchTIR turn rewards
      A_turn_ik = z-score of R_ik over the trajectories of the same prompt at turn index k
      A_ik = w_traj * A_traj_i + w_turn * A_turn_ik     (w = 0.5 / 0.5, gamma = 0.9)
on the generated tokens of turn k.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from mmgym.algos.advantages import (
    ESTIMATORS,
    AdvantageInputs,
    AdvantageOutput,
    EstimatorConfig,
    dense_ids,
    discounted_returns,
    group_normalize,
)
from mmgym.algos.credit import broadcast_turn_values
from mmgym.core.records import ToolCall

__all__ = [
    "MatchTIRConfig",
    "MatchTIREstimatorConfig",
    "assign_rewards",
    "call_similarity",
    "hard_assignment",
    "matchtir_turn_rewards",
    "matchtir_turn_rewards_batch",
    "similarity_matrix",
    "sinkhorn_plan",
    "sinkhorn_plan_batched",
    "soft_assignment",
]

Call = ToolCall | Mapping[str, Any]
Assignment = Literal["hard", "soft"]


@dataclass(frozen=True)
class MatchTIRConfig:
    """MatchTIR hyperparameters (MatchTIR defaults)."""

    assignment: Assignment = "hard"
    """``hard`` (linear-sum assignment) or ``soft`` (Sinkhorn) matching of calls to gold."""
    sinkhorn_reg: float = 0.1
    """Entropic regularisation of the soft assignment."""
    sinkhorn_iters: int = 200
    """Sinkhorn iterations (log-domain; converges well before 200 for matrices this small)."""
    gamma: float = 0.9
    """Discount of the turn-level returns."""
    traj_weight: float = 0.5
    """Weight of the trajectory-level advantage."""
    turn_weight: float = 0.5
    """Weight of the turn-level advantage."""

    def __post_init__(self) -> None:
        if self.assignment not in ("hard", "soft"):
            raise ValueError(f"MatchTIRConfig.assignment must be 'hard' or 'soft', got {self.assignment!r}")
        if not self.sinkhorn_reg > 0:
            raise ValueError(f"MatchTIRConfig.sinkhorn_reg must be > 0 (MatchTIR: 0.1), got {self.sinkhorn_reg}")
        if self.sinkhorn_iters < 1:
            raise ValueError(f"MatchTIRConfig.sinkhorn_iters must be >= 1, got {self.sinkhorn_iters}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"MatchTIRConfig.gamma must lie in [0, 1], got {self.gamma}")
        if self.traj_weight < 0 or self.turn_weight < 0:
            raise ValueError(f"MatchTIRConfig weights must be >= 0, got {self.traj_weight}, {self.turn_weight}")
        if self.traj_weight == 0 and self.turn_weight == 0:
            raise ValueError("MatchTIRConfig.traj_weight and turn_weight are both 0, so every advantage would be 0; "
                             "set at least one > 0 (MatchTIR: 0.5 and 0.5)")


@dataclass(frozen=True)
class MatchTIREstimatorConfig(EstimatorConfig):
    """``EstimatorConfig`` carrying a :class:`MatchTIRConfig` as ``cfg.matchtir`` (any
    ``EstimatorConfig`` without one uses the defaults)."""

    estimator: str = "matchtir"
    matchtir: MatchTIRConfig = field(default_factory=MatchTIRConfig)


def _matchtir_cfg(cfg: EstimatorConfig) -> MatchTIRConfig:
    sub = getattr(cfg, "matchtir", None)
    if sub is None:
        return MatchTIRConfig()
    if not isinstance(sub, MatchTIRConfig):
        raise TypeError(
            f"cfg.matchtir must be a MatchTIRConfig, got {type(sub).__name__}; use MatchTIREstimatorConfig(matchtir=...)"
        )
    return sub


# --------------------------------------------------------------------------- similarity


def _name_args(call: Call) -> tuple[str, Mapping[str, Any]]:
    if isinstance(call, ToolCall):
        return call.name, call.arguments if isinstance(call.arguments, Mapping) else {}
    if isinstance(call, Mapping):
        args = call.get("arguments", {})
        return str(call.get("name", "")), args if isinstance(args, Mapping) else {}
    raise TypeError(f"a tool call must be a ToolCall or a mapping with 'name' and 'arguments', got {type(call).__name__}")


def call_similarity(pred: Call, gold: Call) -> float:
    """sim(p, g) = [1 + IoU(keys) + #exact values] / (2 + #gold params); 0 if names differ.

    >>> call_similarity({"name": "zoom", "arguments": {"bbox": [0, 0, 5, 5], "label": "x"}},
    ...                 {"name": "zoom", "arguments": {"bbox": [0, 0, 5, 5]}})
    0.8333333333333334
    """
    p_name, p_args = _name_args(pred)
    g_name, g_args = _name_args(gold)
    if p_name != g_name:
        return 0.0
    p_keys, g_keys = set(p_args), set(g_args)
    union = p_keys | g_keys
    iou = len(p_keys & g_keys) / len(union) if union else 1.0
    exact = sum(1 for k in g_keys if k in p_args and _same_value(p_args[k], g_args[k]))
    return (1.0 + iou + exact) / (2.0 + len(g_keys))


def _same_value(a: Any, b: Any) -> bool:
    """JSON-style equality: 1 == 1.0, but True != 1 (booleans are not numbers here)."""
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    try:
        return bool(a == b)
    except Exception:  # e.g. arrays, whose == is elementwise and ambiguous as a bool
        return False


def similarity_matrix(preds: Sequence[Call], golds: Sequence[Call]) -> np.ndarray:
    """(P, G) float64 matrix of :func:`call_similarity`."""
    out = np.zeros((len(preds), len(golds)), dtype=np.float64)
    for i, p in enumerate(preds):
        for j, g in enumerate(golds):
            out[i, j] = call_similarity(p, g)
    return out


# --------------------------------------------------------------------------- assignment


def hard_assignment(sim: np.ndarray) -> np.ndarray:
    """One-to-one matching maximising total similarity (Kuhn 1955; scipy's
    ``linear_sum_assignment``).

    Args:
      sim: (P, G) similarities in [0, 1].

    Returns:
      (P,) float64: the similarity of each prediction's matched gold call, 0 for the
      ``max(P - G, 0)`` predictions left unmatched.
    """
    sim = np.asarray(sim, dtype=np.float64)
    out = np.zeros(sim.shape[0], dtype=np.float64)
    if sim.size == 0:
        return out
    rows, cols = linear_sum_assignment(sim, maximize=True)
    out[rows] = sim[rows, cols]
    return out


def _pad_square(sim: torch.Tensor) -> torch.Tensor:
    p, g = sim.shape[-2:]
    n = max(p, g)
    return torch.nn.functional.pad(sim, (0, n - g, 0, n - p))


def sinkhorn_plan_batched(
    sim: torch.Tensor, valid: torch.Tensor, *, reg: float, iters: int
) -> torch.Tensor:
    """Entropic OT plans for a batch of square similarity matrices (Cuturi 2013,
    "Sinkhorn Distances", Alg. 1, in the log domain).

    Maximises <plan, sim> + reg * H(plan) subject to every valid row and column summing
    to 1 (uniform marginals over the ``n_b`` valid entries of matrix b).

    Args:
      sim: (N, n, n) float similarities (padding entries are ignored).
      valid: (N, n) bool, the first ``n_b`` entries of each matrix are valid (rows and
        columns alike: matrices are padded square first).
      reg: entropic regularisation > 0.  iters: number of row+column normalisations.

    Returns:
      (N, n, n) plan, rows and columns of the valid block summing to 1, 0 elsewhere.
    """
    valid = valid.bool()
    both = valid.unsqueeze(2) & valid.unsqueeze(1)
    neg = torch.tensor(-torch.inf, dtype=sim.dtype, device=sim.device)
    log_k = torch.where(both, sim / reg, neg)
    log_u = torch.zeros(sim.shape[:2], dtype=sim.dtype, device=sim.device)
    log_v = torch.zeros_like(log_u)
    zero = torch.zeros((), dtype=sim.dtype, device=sim.device)
    for _ in range(iters):
        # Row sums -> 1, then column sums -> 1 (log-sum-exp keeps exp(sim / reg) finite).
        log_u = torch.where(valid, -torch.logsumexp(log_k + log_v.unsqueeze(1), dim=2), zero)
        log_v = torch.where(valid, -torch.logsumexp(log_k + log_u.unsqueeze(2), dim=1), zero)
    plan = torch.exp(log_k + log_u.unsqueeze(2) + log_v.unsqueeze(1))
    return torch.where(both, plan, zero)


def sinkhorn_plan(sim: np.ndarray, *, reg: float = 0.1, iters: int = 200) -> np.ndarray:
    """Sinkhorn plan of one (P, G) similarity matrix, padded to n = max(P, G) with
    zero-similarity dummies; returns the (P, G) block (each row sums to 1 when P <= G)."""
    sim = np.asarray(sim, dtype=np.float64)
    p, g = sim.shape
    if p == 0 or g == 0:
        return np.zeros((p, g), dtype=np.float64)
    square = _pad_square(torch.from_numpy(sim)).unsqueeze(0)
    n = square.shape[-1]
    plan = sinkhorn_plan_batched(square, torch.ones(1, n, dtype=torch.bool), reg=reg, iters=iters)[0]
    return plan[:p, :g].numpy()


def soft_assignment(sim: np.ndarray, *, reg: float = 0.1, iters: int = 200) -> np.ndarray:
    """(P,) per-prediction reward sum_g plan[p, g] * sim[p, g] under :func:`sinkhorn_plan`."""
    sim = np.asarray(sim, dtype=np.float64)
    if sim.size == 0:
        return np.zeros(sim.shape[0], dtype=np.float64)
    return (sinkhorn_plan(sim, reg=reg, iters=iters) * sim).sum(axis=1)


def assign_rewards(sim: np.ndarray, *, assignment: Assignment = "hard", reg: float = 0.1, iters: int = 200) -> np.ndarray:
    """(P,) per-call rewards from a (P, G) similarity matrix by ``hard`` or ``soft`` assignment."""
    if assignment == "hard":
        return hard_assignment(sim)
    if assignment == "soft":
        return soft_assignment(sim, reg=reg, iters=iters)
    raise ValueError(f"unknown MatchTIR assignment {assignment!r}; known: hard, soft")


# --------------------------------------------------------------------------- turn rewards


def matchtir_turn_rewards(
    turn_calls: Sequence[Sequence[Call]],
    gold_calls: Sequence[Call],
    *,
    assignment: Assignment = "hard",
    reg: float = 0.1,
    iters: int = 200,
) -> list[float]:
    """One trajectory's MatchTIR turn rewards.

    All of the trajectory's predicted calls (turn by turn, in order) are matched against
    its gold calls at once; each turn's reward is the mean reward of its calls.

    Args:
      turn_calls: K turns, each a sequence of calls (``ToolCall`` or ``{"name", "arguments"}``).
      gold_calls: the task's gold calls.

    Returns:
      K floats in [0, 1] (0 for a turn without calls).
    """
    flat = [c for calls in turn_calls for c in calls]
    per_call = assign_rewards(similarity_matrix(flat, gold_calls), assignment=assignment, reg=reg, iters=iters)
    out, start = [], 0
    for calls in turn_calls:
        n = len(calls)
        out.append(float(per_call[start : start + n].mean()) if n else 0.0)
        start += n
    return out


def matchtir_turn_rewards_batch(
    turn_calls: Sequence[Sequence[Sequence[Call]]],
    gold_calls: Sequence[Sequence[Call] | None],
    *,
    num_turns: int,
    assignment: Assignment = "hard",
    reg: float = 0.1,
    iters: int = 200,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """MatchTIR turn rewards for B trajectories, for ``inputs.extra``.

    Args:
      turn_calls: B trajectories x K_b turns x calls (``Turn.tool_calls`` per turn).
      gold_calls: B gold call lists; ``None`` (or an empty list) = no gold for that task.
      num_turns: K, the padded number of turns (turns beyond K_b are 0).

    Returns:
      (turn rewards (B, K), has_gold (B,) bool, metrics ``{"matchtir_skipped": n}`` =
      trajectories without gold, whose rewards are all 0).
    """
    if len(turn_calls) != len(gold_calls):
        raise ValueError(f"turn_calls has {len(turn_calls)} trajectories but gold_calls has {len(gold_calls)}")
    rewards = torch.zeros(len(turn_calls), num_turns, dtype=dtype)
    has_gold = torch.zeros(len(turn_calls), dtype=torch.bool)
    skipped = 0
    for b, (calls, gold) in enumerate(zip(turn_calls, gold_calls)):
        if not gold:
            skipped += 1
            continue
        if len(calls) > num_turns:
            raise ValueError(f"trajectory {b} has {len(calls)} turns but num_turns is {num_turns}; pass the padded K")
        r = matchtir_turn_rewards(calls, gold, assignment=assignment, reg=reg, iters=iters)
        rewards[b, : len(r)] = torch.tensor(r, dtype=dtype)
        has_gold[b] = True
    return rewards, has_gold, {"matchtir_skipped": float(skipped)}


# --------------------------------------------------------------------------- advantage


@ESTIMATORS.register("matchtir")
def matchtir(inputs: AdvantageInputs, cfg: EstimatorConfig) -> AdvantageOutput:
    """MatchTIR dual-level advantage A = w_traj * A_traj + w_turn * A_turn (module docstring).

    Reads ``inputs.extra["matchtir_turn_rewards"]`` (B, K) (default: ``inputs.turn_rewards``)
    and ``inputs.extra["has_gold"]`` (B,) bool (default: all True) from
    :func:`matchtir_turn_rewards_batch`, ``inputs.outcome`` (B,) for the trajectory level,
    and ``cfg.matchtir`` (a :class:`MatchTIRConfig`). A trajectory without gold calls gets
    (w_traj + w_turn) * A_traj and takes no part in the turn-level statistics. Turn returns
    are z-scored over the real turns (``turn_mask``) of one prompt group at one turn
    index; a (group, turn) cell with one trajectory gets A_turn = 0. Returns (B, T).
    """
    mc = _matchtir_cfg(cfg)
    extra = inputs.extra or {}
    turn_r = extra.get("matchtir_turn_rewards", inputs.turn_rewards)
    b, k = inputs.turn_rewards.shape
    if tuple(turn_r.shape) != (b, k):
        raise ValueError(f"inputs.extra['matchtir_turn_rewards'] has shape {tuple(turn_r.shape)}, expected (B, K) = {(b, k)}")
    has_gold = extra.get("has_gold")
    if has_gold is None:
        has_gold = torch.ones(b, dtype=torch.bool, device=turn_r.device)
    elif tuple(has_gold.shape) != (b,):
        raise ValueError(f"inputs.extra['has_gold'] has shape {tuple(has_gold.shape)}, expected (B,) = ({b},)")
    has_gold = has_gold.bool()
    dtype = inputs.outcome.dtype
    turn_r = turn_r.to(dtype)

    seg, n = dense_ids(inputs.group_ids)
    a_traj = group_normalize(inputs.outcome, seg, n, std=True, eps=cfg.eps)
    valid = inputs.turn_mask & has_gold.unsqueeze(1)
    returns = discounted_returns(turn_r, valid, gamma=mc.gamma)
    cell = seg.unsqueeze(1) * k + torch.arange(k, device=seg.device).unsqueeze(0)
    a_turn = group_normalize(returns.reshape(-1), cell.reshape(-1), n * k, valid=valid.reshape(-1), std=True, eps=cfg.eps)
    a_turn = a_turn.reshape(b, k)
    with_gold = mc.traj_weight * a_traj.unsqueeze(1) + mc.turn_weight * a_turn
    without = ((mc.traj_weight + mc.turn_weight) * a_traj).unsqueeze(1).expand(b, k)
    per_turn = torch.where(has_gold.unsqueeze(1), with_gold, without)
    return AdvantageOutput(broadcast_turn_values(per_turn, inputs.token_turn, inputs.action_mask))
