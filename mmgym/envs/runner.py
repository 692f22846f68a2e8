"""``GroupRunner``: step only the still-active envs of a group, for multi-turn group rollouts.

G envs roll out the same task (GRPO groups); each episode ends at its own turn, and
finished envs stop being stepped (and stop costing model compute upstream).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

__all__ = ["GroupRunner", "StepResult"]


@dataclass(slots=True)
class StepResult:
    obs: dict[str, Any]
    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated


class GroupRunner:
    """Holds ``G`` envs; ``reset`` gives them one task, ``step({i: action})`` steps only those.

    >>> import gymnasium as gym, mmgym
    >>> runner = GroupRunner([gym.make("mmgym/ChainOfFocus-v0") for _ in range(2)])
    >>> obs, infos = runner.reset(seed=0, task_index=3)
    >>> sorted(runner.active)
    [0, 1]
    """

    def __init__(self, envs: Sequence[gym.Env] | None = None, *, env_fn: Callable[[], gym.Env] | None = None, size: int | None = None):
        if envs is None:
            if env_fn is None or not size:
                raise ValueError("GroupRunner needs envs, or env_fn and size")
            envs = [env_fn() for _ in range(size)]
        if not envs:
            raise ValueError("GroupRunner needs at least one env")
        self.envs = list(envs)
        self.active: set[int] = set()

    def __len__(self) -> int:
        return len(self.envs)

    def reset(self, *, seed: int | None = None, task_index: int | None = None, options: dict | None = None) -> tuple[list[dict], list[dict]]:
        """Reset all envs to the same task.

        With ``task_index`` every env gets that fixed task; otherwise every env is reset
        with the same ``seed`` (one fresh random seed when ``seed`` is None), so the
        group shares one task.
        """
        opts = dict(options or {})
        if task_index is not None:
            opts["task_index"] = task_index
        elif seed is None:
            seed = int(np.random.SeedSequence().generate_state(1)[0] >> 1)
        results = [env.reset(seed=None if seed is None else seed, options=dict(opts)) for env in self.envs]
        self.active = set(range(len(self.envs)))
        return [r[0] for r in results], [r[1] for r in results]

    def step(self, actions: dict[int, Any]) -> dict[int, StepResult]:
        """Step env ``i`` with ``actions[i]`` for each active ``i``; finished envs become inactive."""
        unknown = [i for i in actions if i not in self.active]
        if unknown:
            raise ValueError(f"envs {sorted(unknown)} are not active (finished or never reset); active: {sorted(self.active)}")
        out: dict[int, StepResult] = {}
        for i, a in actions.items():
            obs, r, term, trunc, info = self.envs[i].step(a)
            res = StepResult(obs, float(r), bool(term), bool(trunc), info)
            if res.done:
                self.active.discard(i)
            out[i] = res
        return out

    @property
    def done(self) -> bool:
        return not self.active

    def close(self) -> None:
        for env in self.envs:
            env.close()
