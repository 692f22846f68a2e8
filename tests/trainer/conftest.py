"""Shared fixtures of the trainer tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

# An in-process RL run small enough for a test: the shipped warm start, 2 tasks x 2
# episodes, one evaluation episode, no HTML pages, one torch thread.
IN_PROCESS_TINY = (
    "model.path=embedded:focus_warm", "rollout.tasks_per_iter=2", "rollout.group_size=2",
    "rollout.max_new_tokens=24", "env.eval_episodes=1", "env.eval_every=0", "sample_episodes=0",
    "algo.minibatch_size=4", "threads=1",
)


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., object]:
    """``tiny_config(out_root, *overrides)`` -> a ``TrainConfig`` of ``IN_PROCESS_TINY``
    plus ``overrides`` (later ones win), writing its run folder under ``out_root``."""
    from mmgym.core import load_config
    from mmgym.trainer import TrainConfig

    def make(out_root: Path, *overrides: str) -> TrainConfig:
        return load_config(TrainConfig, overrides=[*IN_PROCESS_TINY, f"out_root={out_root}", *overrides])

    return make
