"""``check_mm_env``: mmgym's conformance checker, runnable on any third-party env.

Complements ``gymnasium.utils.env_checker.check_env`` with the multimodal contract of
DESIGN §2: placeholder invariants, every key present, observations inside the space,
seeded determinism over a scripted sequence of actions, and fuzzed text actions (bad
JSON, unknown tools, huge numbers, unicode, nested tags) that must never raise.
"""

from __future__ import annotations

import json
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.utils.env_checker import data_equivalence

from mmgym.core import UnicodeText

__all__ = ["check_mm_env", "check_observation", "FUZZ_ACTIONS", "MMEnvCheckError"]

OBS_KEYS = ("text", "images", "frames", "frame_times", "source", "turn")


class MMEnvCheckError(AssertionError):
    """An env broke the mmgym contract; the message says which rule."""


FUZZ_ACTIONS: tuple[str, ...] = (
    "",
    "hello",
    "<answer></answer>",
    "<answer>A</answer>",
    "<answer>" + "x" * 5000 + "</answer>",
    "<tool_call>",
    "<tool_call>{</tool_call>",
    '<tool_call>{"name": "zoom"</tool_call>',
    '<tool_call>{"name": "nope", "arguments": {}}</tool_call>',
    '<tool_call>{"name": 5, "arguments": []}</tool_call>',
    '<tool_call>{"name": "zoom", "arguments": {"bbox": [1e308, -1e308, 1e400, 0]}}</tool_call>',
    '<tool_call>{"name": "zoom", "arguments": {"bbox": [NaN, 0, 10, 10]}}</tool_call>',
    '<tool_call>{"name": "zoom", "arguments": {"region": 99999999999999999999}}</tool_call>',
    '<tool_call>{"name": "zoom", "arguments": "not json"}</tool_call>',
    "<tool_call><tool_call>{}</tool_call></tool_call>",
    "<answer><answer>B</answer></answer>",
    "<think>hmm</think><answer>B</answer>",
    "中文 🙂 \u0000",
    "<image><image><video>",
    '<tool_call>{"name": "zoom", "arguments": {"bbox": [0, 0, 10, 10]}}</tool_call><answer>A</answer>',
    "[" * 2000,
    '<tool_call>' + '{"a":' * 500 + '1' + '}' * 500 + '</tool_call>',
)


def check_observation(env: gym.Env, obs: Any, where: str) -> None:
    """Raise ``MMEnvCheckError`` unless ``obs`` follows DESIGN §2 and lies in the space."""
    if not isinstance(obs, dict):
        raise MMEnvCheckError(f"{where}: observation must be a dict, got {type(obs).__name__}")
    missing = [k for k in OBS_KEYS if k not in obs]
    if missing:
        raise MMEnvCheckError(f"{where}: observation lacks keys {missing}")
    if not isinstance(obs["images"], tuple) or not isinstance(obs["frames"], tuple):
        raise MMEnvCheckError(f"{where}: images and frames must be tuples")
    n_ph = obs["text"].count("<image>")
    if n_ph != len(obs["images"]):
        raise MMEnvCheckError(f"{where}: text has {n_ph} <image> placeholders but {len(obs['images'])} images")
    if len(obs["frames"]) != len(obs["frame_times"]):
        raise MMEnvCheckError(f"{where}: {len(obs['frames'])} frames but {len(obs['frame_times'])} frame_times")
    for img in (*obs["images"], *obs["frames"]):
        if not (isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3):
            raise MMEnvCheckError(f"{where}: every image must be a uint8 HxWx3 array")
    if not env.observation_space.contains(obs):
        bad = [k for k, sp in env.observation_space.spaces.items() if k in obs and not sp.contains(obs[k])]
        raise MMEnvCheckError(f"{where}: observation not in observation_space (keys {bad})")


def _check_step(env: gym.Env, action: Any, where: str) -> tuple[Any, float, bool, bool, dict]:
    try:
        out = env.step(action)
    except Exception as e:  # noqa: BLE001 - the point is to report any raise
        raise MMEnvCheckError(f"{where}: step({str(action)[:60]!r}) raised {type(e).__name__}: {e}") from e
    obs, reward, term, trunc, info = out
    check_observation(env, obs, where)
    if not (isinstance(term, bool) and isinstance(trunc, bool)):
        raise MMEnvCheckError(f"{where}: terminated/truncated must be Python bools")
    if term and trunc:
        raise MMEnvCheckError(f"{where}: terminated and truncated are both true")
    if not np.isfinite(reward):
        raise MMEnvCheckError(f"{where}: reward {reward} is not finite")
    terms = info.get("reward_terms")
    if not isinstance(terms, dict):
        raise MMEnvCheckError(f"{where}: info['reward_terms'] must be a dict")
    if abs(sum(terms.values()) - float(reward)) > 1e-6:
        raise MMEnvCheckError(f"{where}: reward {reward} != sum of reward_terms {terms}")
    if term or trunc:
        for k in ("success", "score", "termination_reason"):
            if k not in info:
                raise MMEnvCheckError(f"{where}: final info lacks {k!r}")
    return out


def _rollout(env: gym.Env, seed: int, actions: list[Any]) -> list[Any]:
    obs, info = env.reset(seed=seed)
    trace: list[Any] = [obs, _jsonable(info)]
    for a in actions:
        obs, r, term, trunc, info = env.step(a)
        trace.append((obs, r, term, trunc, _jsonable(info)))
        if term or trunc:
            break
    return trace


def _jsonable(info: dict) -> str:
    return json.dumps(info, sort_keys=True, default=lambda o: np.asarray(o).tolist())


def _fuzz_actions(env: gym.Env, rng: np.random.Generator, n: int) -> list[Any]:
    """The fixed malformed replies plus random ``UnicodeText`` samples (at least ``n`` in all);
    for a non-text action space, ``n`` samples of that space."""
    env.action_space.seed(int(rng.integers(2**31)))
    if not isinstance(env.action_space, UnicodeText):
        return [env.action_space.sample() for _ in range(n)]
    return list(FUZZ_ACTIONS) + [env.action_space.sample() for _ in range(max(0, n - len(FUZZ_ACTIONS)))]


def check_mm_env(env: gym.Env, *, seed: int = 0, fuzz_steps: int = 40, oracle_steps: int = 20) -> None:
    """Check the mmgym contract; raise ``MMEnvCheckError`` naming the first violation.

    1. ``reset`` returns a conforming observation and info with ``task_id``, ``tool_schemas``
       and ``max_turns``; 2. the same seed gives the same trajectory (observations, rewards,
       infos) for the same actions, including the env's own oracle actions; 3. fuzzed
       actions never raise and every step conforms; 4. a finished episode reports
       ``success``, ``score`` and ``termination_reason``.
    """
    base = env.unwrapped
    obs, info = env.reset(seed=seed)
    check_observation(env, obs, "reset")
    for k in ("task_id", "tool_schemas", "max_turns"):
        if k not in info:
            raise MMEnvCheckError(f"reset info lacks {k!r}")
    rng = np.random.default_rng(seed)
    fuzz = _fuzz_actions(env, rng, fuzz_steps)
    # determinism over fuzzed actions
    t1, t2 = _rollout(env, seed, fuzz[:8]), _rollout(env, seed, fuzz[:8])
    if not data_equivalence(t1, t2):
        raise MMEnvCheckError("the same seed and actions gave different observations, rewards or infos")
    # fuzz: every action on a fresh or continuing episode
    env.reset(seed=seed + 1)
    for i, a in enumerate(fuzz):
        _, _, term, trunc, _ = _check_step(env, a, f"fuzz step {i}")
        if term or trunc:
            obs, _ = env.reset(seed=seed + 2 + i)
            check_observation(env, obs, f"reset after fuzz step {i}")
    # oracle episodes (if the env has an oracle): conforming, deterministic and finishing
    if hasattr(base, "oracle_action"):
        for rep in range(2):
            env.reset(seed=seed + 100)
            trace = []
            for i in range(oracle_steps):
                try:
                    a = base.oracle_action()
                except NotImplementedError:
                    return
                step = _check_step(env, a, f"oracle step {i}")
                trace.append((step[0], step[1], _jsonable(step[4])))
                if step[2] or step[3]:
                    break
            else:
                raise MMEnvCheckError(f"the oracle did not finish an episode within {oracle_steps} steps")
            if rep == 0:
                first = trace
            elif not data_equivalence(first, trace):
                raise MMEnvCheckError("oracle episodes with the same seed differ")
