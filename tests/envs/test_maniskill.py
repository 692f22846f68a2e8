"""ManiSkill3 wrapper (extra ``maniskill``). Skipped, with the reason, when mani_skill or a
usable Vulkan device is missing; CI installs both (Mesa 25 lavapipe on the CPU)."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest

from mmgym.envs.maniskill import MissingExtraError, maniskill_unavailable_reason

REASON = maniskill_unavailable_reason()
needs_maniskill = pytest.mark.skipif(REASON is not None, reason=f"ManiSkill unavailable: {REASON}")


def test_missing_extra_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from mmgym.envs import maniskill

    monkeypatch.setitem(sys.modules, "mani_skill", None)
    monkeypatch.setitem(sys.modules, "mani_skill.envs", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'mmgym\[maniskill\]'"):
        maniskill.ManiSkillEnv(task="PickCube-v1")
    assert issubclass(MissingExtraError, ImportError)  # the registry test skips on ImportError


@pytest.fixture(scope="module")
def pick():
    import gymnasium as gym

    import mmgym  # noqa: F401

    env = gym.make("mmgym/ManiSkill-PickCube-v0", chunk_size=2, max_steps=8, proprio="key", reward="shaped")
    yield env
    env.close()


@needs_maniskill
def test_pickcube_checkers_and_camera_image(pick) -> None:
    from gymnasium.utils.env_checker import check_env

    from mmgym.envs.checker import check_mm_env

    obs, info = pick.reset(seed=0)
    img = obs["images"][0]
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8 and img.std() > 5  # a real rendered picture
    assert "pick up the red cube" in obs["text"] and info["max_turns"] == 4
    assert obs["proprio"].shape == (pick.unwrapped.proprio_dim,)
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=UserWarning)
        check_env(pick.unwrapped, skip_render_check=True)
    check_mm_env(pick, fuzz_steps=12)


@needs_maniskill
def test_bad_tokens_hold_still_and_episode_info(pick) -> None:
    pick.reset(seed=1)
    tcp0 = pick.unwrapped._sim_proprio()[-7:-4].copy()
    obs, r, term, trunc, info = pick.step("<act_300>" * 14)
    assert obs["source"] == 2 and "out of range" in info["parse_error"] and r == pytest.approx(-0.1)
    assert np.linalg.norm(pick.unwrapped._sim_proprio()[-7:-4] - tcp0) < 0.01  # the arm held still
    tok = pick.unwrapped.tokenizer
    up = np.array([[0, 0, 1.0, 0, 0, 0, 1.0]] * 2)
    done = False
    while not done:
        obs, r, term, trunc, info = pick.step(tok.format(up))
        done = term or trunc
    assert trunc and info["termination_reason"] == "max_turns" and info["episode_length"] == 8 and info["success"] is False
    assert set(info["reward_terms"]) == {"grasp", "consecutive_grasp", "success", "format"}
