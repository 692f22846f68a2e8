"""Every registered mmgym/ id passes Gymnasium's check_env and mmgym's check_mm_env."""

from __future__ import annotations

import warnings

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import mmgym  # noqa: F401
from mmgym.envs import registration
from mmgym.envs.checker import check_mm_env

NEEDS_EXTRA: dict[str, str] = getattr(registration, "NEEDS_EXTRA", {})


def _make(env_id: str) -> gym.Env:
    if env_id in NEEDS_EXTRA:
        try:
            return gym.make(env_id)
        except ImportError as e:  # the extra (or its system dependency) is missing here
            pytest.skip(f"{env_id} needs the '{NEEDS_EXTRA[env_id]}' extra: {e}")
    return gym.make(env_id)


@pytest.mark.parametrize("env_id", sorted(registration.ENV_IDS))
def test_check_env_and_check_mm_env(env_id: str) -> None:
    env = _make(env_id)
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=UserWarning)  # check_env warnings are contract violations
        try:
            check_env(env.unwrapped, skip_render_check=True)
        finally:
            warnings.resetwarnings()
    check_mm_env(env)
    env.close()


def test_every_id_is_registered_with_gymnasium() -> None:
    for env_id in registration.ENV_IDS:
        assert env_id in gym.registry, env_id


def test_make_with_module_prefix_works_without_import() -> None:
    import subprocess
    import sys

    code = "import gymnasium as gym; e = gym.make('mmgym:mmgym/ChainOfFocus-v0'); e.reset(seed=0); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("ok"), out.stderr
