"""``ChaosEnv``: a wrapper that misbehaves on command, for testing fault recovery.

An action starting with one of these tokens triggers a fault instead of a step:
``!hang`` (sleep forever), ``!sleep S`` (sleep S seconds, then step normally),
``!raise`` (raise ``RuntimeError``), ``!exit`` (the process dies at once, as a segfault
would). Any other action goes to the wrapped env unchanged.
"""

from __future__ import annotations

import os
import time
from typing import Any

import gymnasium as gym

from mmgym.envs.pool.worker import make_env

__all__ = ["ChaosEnv", "make_chaos_env"]


class ChaosEnv(gym.Wrapper):
    """See the module docstring."""

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        if isinstance(action, str) and action.startswith("!"):
            cmd, _, arg = action.partition(" ")
            if cmd == "!hang":
                while True:
                    time.sleep(3600)
            if cmd == "!sleep":
                time.sleep(float(arg or 1.0))
                action = "<answer>A</answer>"
            elif cmd == "!raise":
                raise RuntimeError("ChaosEnv: injected failure")
            elif cmd == "!exit":
                os._exit(13)
        return self.env.step(action)


def make_chaos_env(env_id: str, kwargs: dict[str, Any] | None = None) -> ChaosEnv:
    """``ChaosEnv(gymnasium.make(env_id, **kwargs))``; picklable through ``functools.partial``."""
    return ChaosEnv(make_env(env_id, dict(kwargs or {})))
