"""Which tasks to roll out, and which groups to keep.

- :func:`dynamic_sampling_filter` and :func:`collect_dynamic_batches`: DAPO dynamic
  sampling (drop groups whose rewards are all equal, refill from further generation
  batches); :func:`overlong_shaping`: DAPO's soft overlong punishment.
- Task samplers (registry ``SAMPLERS``), all with one interface (:class:`TaskSampler`):
  ``select(n, rng) -> list[int]``, ``update(task_ids, successes)``, ``state_dict()`` and
  ``load_state_dict(state)`` with plain JSON-able state, saved with checkpoints.
  ``"uniform"`` and ``"vade"`` (Beta posterior per task, Thompson draws, information score).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from mmgym.core.registry import Registry

__all__ = [
    "SAMPLERS",
    "DynamicSamplingResult",
    "TaskSampler",
    "UniformSampler",
    "VADESampler",
    "collect_dynamic_batches",
    "dynamic_sampling_filter",
    "overlong_shaping",
]


# --------------------------------------------------------------------------- DAPO


def dynamic_sampling_filter(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """DAPO dynamic sampling (Yu et al. 2025, arXiv:2503.14476, §3.2, the constraint
    0 < |{o_i : correct}| < G of the DAPO objective): keep only groups whose rewards are
    not all equal (an all-equal group has zero advantage and gives no gradient).

    Args:
      rewards: (B,) float, one scalar per trajectory (the reward the advantage uses).
      group_ids: (B,) long, trajectories of one prompt share an id.

    Returns:
      (B,) bool keep mask; a group of one trajectory is dropped.
    """
    uniq, seg = torch.unique(group_ids, return_inverse=True)
    n = int(uniq.shape[0])
    hi = torch.full((n,), -torch.inf, dtype=rewards.dtype, device=rewards.device)
    lo = torch.full((n,), torch.inf, dtype=rewards.dtype, device=rewards.device)
    hi = hi.scatter_reduce(0, seg, rewards, reduce="amax", include_self=True)
    lo = lo.scatter_reduce(0, seg, rewards, reduce="amin", include_self=True)
    return (hi > lo).index_select(0, seg)


@dataclass(slots=True)
class DynamicSamplingResult:
    """What :func:`collect_dynamic_batches` gathered.

    batches: the generation batches that contributed rows (in order).
    keep: one (B_i,) bool mask per batch: the rows to train on (whole groups only).
    num_groups: groups kept in total; num_gen_batches: generation batches drawn;
    filled: True if ``num_groups`` reached the target.
    """

    batches: list[Any] = field(default_factory=list)
    keep: list[torch.Tensor] = field(default_factory=list)
    num_groups: int = 0
    num_gen_batches: int = 0
    filled: bool = False


def collect_dynamic_batches(
    generate: Callable[[int], tuple[Any, torch.Tensor, torch.Tensor]],
    *,
    num_groups: int,
    max_gen_batches: int = 10,
) -> DynamicSamplingResult:
    """DAPO's refill loop: generate, drop all-equal groups, repeat until ``num_groups``
    informative groups are collected or ``max_gen_batches`` batches were drawn (DAPO: up
    to 10 generation batches, each ~3x the train batch).

    Args:
      generate: ``generate(i) -> (batch, rewards (B_i,), group_ids (B_i,))`` for the i-th
        generation batch (``batch`` is opaque here: the trainer's rollout batch).
      num_groups: groups wanted; extra groups of the last batch are left out so exactly
        this many are kept when the target is reached.
      max_gen_batches: at most this many calls to ``generate``.

    Returns:
      A :class:`DynamicSamplingResult`; check ``filled`` (the trainer decides whether to
      train on fewer groups or stop with an error).
    """
    if num_groups < 1 or max_gen_batches < 1:
        raise ValueError(f"num_groups and max_gen_batches must be >= 1, got {num_groups}, {max_gen_batches}")
    result = DynamicSamplingResult()
    for i in range(max_gen_batches):
        batch, rewards, group_ids = generate(i)
        result.num_gen_batches = i + 1
        keep = dynamic_sampling_filter(rewards, group_ids)
        kept_groups = torch.unique(group_ids[keep])
        need = num_groups - result.num_groups
        if kept_groups.numel() > need:
            keep = keep & torch.isin(group_ids, kept_groups[:need])
            kept_groups = kept_groups[:need]
        if kept_groups.numel() > 0:
            result.batches.append(batch)
            result.keep.append(keep)
            result.num_groups += int(kept_groups.numel())
        if result.num_groups >= num_groups:
            result.filled = True
            break
    return result


def overlong_shaping(
    lengths: torch.Tensor, max_len: int, buffer: int, *, penalty_factor: float = 1.0
) -> torch.Tensor:
    """DAPO soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, §3.4, R_length).

    With L_exp = max_len - buffer: 0 for |y| <= L_exp, (L_exp - |y|) / buffer for
    L_exp < |y| <= max_len, -1 beyond; times ``penalty_factor``. Add it to the reward.

    Args:
      lengths: (B,) generated lengths |y| (int or float).
      max_len: L_max; buffer: L_cache (0 < buffer <= max_len).

    Returns:
      (B,) float penalty in [-penalty_factor, 0].
    """
    if not 0 < buffer <= max_len:
        raise ValueError(f"need 0 < buffer <= max_len, got buffer={buffer}, max_len={max_len}")
    expected = max_len - buffer
    over = (lengths.to(torch.float32) - expected) / buffer
    return -over.clamp(0.0, 1.0) * penalty_factor


# --------------------------------------------------------------------------- task samplers


@runtime_checkable
class TaskSampler(Protocol):
    """Chooses which task indices to roll out next."""

    num_tasks: int

    def select(self, n: int, rng: np.random.Generator) -> list[int]: ...

    def update(self, task_ids: Sequence[int], successes: Sequence[float]) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


SAMPLERS: Registry[Callable[..., TaskSampler]] = Registry("task sampler")


def _check_n(n: int) -> None:
    if n < 0:
        raise ValueError(f"cannot select {n} tasks; n must be >= 0")


def _check_num_tasks(num_tasks: int) -> None:
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")


@SAMPLERS.register("uniform")
class UniformSampler:
    """Uniform over tasks: ``n <= num_tasks`` distinct tasks, else every task
    ``n // num_tasks`` times plus a uniform draw for the rest."""

    def __init__(self, num_tasks: int):
        _check_num_tasks(num_tasks)
        self.num_tasks = num_tasks

    def select(self, n: int, rng: np.random.Generator) -> list[int]:
        _check_n(n)
        reps, rest = divmod(n, self.num_tasks)
        picks = np.concatenate([np.tile(np.arange(self.num_tasks), reps), rng.permutation(self.num_tasks)[:rest]])
        return [int(i) for i in picks]

    def update(self, task_ids: Sequence[int], successes: Sequence[float]) -> None:
        if len(task_ids) != len(successes):
            raise ValueError(f"{len(task_ids)} task ids but {len(successes)} successes")

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "uniform", "num_tasks": self.num_tasks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_tasks") != self.num_tasks:
            raise ValueError(f"sampler state is for {state.get('num_tasks')} tasks, this sampler has {self.num_tasks}")


@SAMPLERS.register("vade")
class VADESampler:
    """VADE (Hu et al. 2025, "Variance-Aware Dynamic Sampling via Online Sample-Level
    Difficulty Estimation for Multimodal RL", arXiv:2511.18902).

    - Per task a Beta(alpha, beta) posterior over its success probability p, starting at
      the prior (``prior_alpha``, ``prior_beta``); ``update`` adds successes to alpha and
      failures to beta (fractional scores in [0, 1] count fractionally).
    - ``select`` draws p~ ~ Beta(alpha, beta) for every task (Thompson sampling) and takes
      the tasks with the largest information score p~ (1 - p~), the expected variance of a
      group's 0/1 rewards, i.e. tasks likeliest to give non-zero GRPO advantages.
    - Two-scale decay toward the prior keeps the estimate current while the policy
      changes: every ``update`` shrinks all tasks' evidence by ``slow_decay`` (unseen tasks
      drift back to the prior over ~1/(1-slow_decay) updates), and a task that gets new
      results first shrinks its old evidence by ``fast_decay`` (new results outweigh old
      ones). Shrinking means alpha <- prior_alpha + d * (alpha - prior_alpha), same for beta.
      The paper gives the two-scale idea; these two factors are our reading of it.
    """

    def __init__(
        self,
        num_tasks: int,
        *,
        prior_alpha: float = 1.0,
        prior_beta: float = 1.0,
        fast_decay: float = 0.8,
        slow_decay: float = 0.995,
    ):
        _check_num_tasks(num_tasks)
        if prior_alpha <= 0 or prior_beta <= 0:
            raise ValueError(f"prior_alpha and prior_beta must be > 0, got {prior_alpha}, {prior_beta}")
        for name, d in (("fast_decay", fast_decay), ("slow_decay", slow_decay)):
            if not 0.0 <= d <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1] (1 = never forget), got {d}")
        self.num_tasks = num_tasks
        self.prior_alpha = float(prior_alpha)
        self.prior_beta = float(prior_beta)
        self.fast_decay = float(fast_decay)
        self.slow_decay = float(slow_decay)
        self.alpha = np.full(num_tasks, self.prior_alpha)
        self.beta = np.full(num_tasks, self.prior_beta)
        self.num_updates = 0

    def mean(self) -> np.ndarray:
        """(num_tasks,) posterior mean success probability."""
        return self.alpha / (self.alpha + self.beta)

    def information(self, p: np.ndarray) -> np.ndarray:
        """Information score p (1 - p) (largest at p = 0.5)."""
        return p * (1.0 - p)

    def select(self, n: int, rng: np.random.Generator) -> list[int]:
        """``n`` task indices, distinct when ``n <= num_tasks`` (else full rounds first)."""
        _check_n(n)
        reps, rest = divmod(n, self.num_tasks)
        picks = [np.arange(self.num_tasks)] * reps
        if rest:
            draws = rng.beta(self.alpha, self.beta)
            score = self.information(draws)
            # Ties (e.g. identical draws) break by a random permutation, not by index.
            order = rng.permutation(self.num_tasks)
            top = order[np.argsort(-score[order], kind="stable")[:rest]]
            picks.append(top)
        return [int(i) for i in np.concatenate(picks)] if picks else []

    def _shrink(self, d: float, idx: np.ndarray | slice) -> None:
        self.alpha[idx] = self.prior_alpha + d * (self.alpha[idx] - self.prior_alpha)
        self.beta[idx] = self.prior_beta + d * (self.beta[idx] - self.prior_beta)

    def update(self, task_ids: Sequence[int], successes: Sequence[float]) -> None:
        """Record rollout results: one (task id, success in [0, 1]) per trajectory."""
        ids = np.asarray(task_ids, dtype=np.int64).reshape(-1)
        wins = np.asarray(successes, dtype=np.float64).reshape(-1)
        if ids.shape != wins.shape:
            raise ValueError(f"{ids.size} task ids but {wins.size} successes")
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_tasks):
            raise ValueError(f"task ids must lie in [0, {self.num_tasks}), got {ids.min()}..{ids.max()}")
        if wins.size and (wins.min() < 0 or wins.max() > 1):
            raise ValueError("successes must lie in [0, 1] (booleans or scores)")
        self._shrink(self.slow_decay, slice(None))
        seen = np.unique(ids)
        self._shrink(self.fast_decay, seen)
        np.add.at(self.alpha, ids, wins)
        np.add.at(self.beta, ids, 1.0 - wins)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "vade",
            "num_tasks": self.num_tasks,
            "prior_alpha": self.prior_alpha,
            "prior_beta": self.prior_beta,
            "fast_decay": self.fast_decay,
            "slow_decay": self.slow_decay,
            "alpha": [float(x) for x in self.alpha],
            "beta": [float(x) for x in self.beta],
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "vade":
            raise ValueError(f"sampler state is of kind {state.get('kind')!r}, expected 'vade'")
        if state.get("num_tasks") != self.num_tasks:
            raise ValueError(f"sampler state is for {state.get('num_tasks')} tasks, this sampler has {self.num_tasks}")
        alpha = np.asarray(state["alpha"], dtype=np.float64)
        beta = np.asarray(state["beta"], dtype=np.float64)
        if alpha.shape != (self.num_tasks,) or beta.shape != (self.num_tasks,):
            raise ValueError(f"sampler state alpha/beta must have {self.num_tasks} entries")
        self.prior_alpha = float(state["prior_alpha"])
        self.prior_beta = float(state["prior_beta"])
        self.fast_decay = float(state["fast_decay"])
        self.slow_decay = float(state["slow_decay"])
        self.alpha = alpha
        self.beta = beta
        self.num_updates = int(state["num_updates"])
