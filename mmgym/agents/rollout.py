"""Multi-turn group rollouts: N tasks x G episodes, one policy call per turn.

Each turn, every still-running episode of every group is batched into one
``policy.generate`` call; each env is stepped with its reply; episodes finish at their
own turn and leave the batch (finished episodes cost no more model compute).
Everything is recorded in ``Trajectory`` records: per-turn observations, replies,
rewards, reward terms, tool calls and ``state_key`` (GiGPO anchor states), and for
model policies the exact token sequence with action mask and sampler log-probs
(``mmgym.agents.tokens``), ready for ``build_rollout_batch``.

>>> import gymnasium as gym, mmgym
>>> from mmgym.agents import RolloutCollector, ScriptedPolicy
>>> col = RolloutCollector(lambda: gym.make("mmgym/ChainOfFocus-v0"), num_tasks=1, group_size=2)
>>> trajs = col.collect(ScriptedPolicy(lambda conv: "<answer>A</answer>"), seeds=[0])
>>> len(trajs), trajs[0].termination_reason
(2, 'answer')
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import gymnasium as gym
import numpy as np

from mmgym.agents.chat import Conversation
from mmgym.agents.policy import Generation, Policy, SamplingParams
from mmgym.agents.tokens import TEMPERATURE_KEY, TokenState
from mmgym.core import ToolCall, Trajectory, Turn
from mmgym.envs.runner import GroupRunner

__all__ = ["RolloutSettings", "RolloutCollector", "EpisodeSlot", "collect_rollouts"]

logger = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class RolloutSettings:
    """How episodes are played.

    max_turns: stop an episode after this many replies (truncated, reason
        ``max_turns``) even if the env would allow more; ``None``: the env decides.
    system_prompt: system message before the task (``None``: the env's reset-info
        ``system_prompt`` if it gives one, else the chat template's default).
    tool_result_role: chat role of tool results (``"user"`` works with every template).
    keep_images: store each turn's images on ``Turn.images`` (for episode pages).
    tool_schemas: pass the env's tool schemas to the chat template (``tools=``). Off
        saves the template's tool preamble (~180 tokens) when the task text already says
        how to call the tools, as for small models trained on one task.
    """

    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_turns: int | None = None
    system_prompt: str | None = None
    tool_result_role: Literal["user", "tool"] = "user"
    keep_images: bool = True
    tool_schemas: bool = True

    def __post_init__(self) -> None:
        if self.max_turns is not None and self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1 or None, got {self.max_turns}")


@dataclass(slots=True)
class EpisodeSlot:
    """One running episode: its env (inside a group), conversation and record."""

    group: int
    index: int  # env index inside its group
    env: gym.Env
    conv: Conversation
    traj: Trajectory
    obs: dict[str, Any]
    info: dict[str, Any]
    turn: int = 0
    done: bool = False


class RolloutCollector:
    """Holds ``num_tasks`` groups of ``group_size`` envs and plays them with a policy.

    Args:
        env_fn: builds one env (e.g. ``lambda: gym.make("mmgym/ChainOfFocus-v0")``), or
            an env id string for ``gymnasium.make``.
        num_tasks: groups (distinct tasks) per ``collect`` call.
        group_size: episodes per task (G of GRPO).
        settings: see ``RolloutSettings``.
        env_kwargs: keyword arguments for ``gymnasium.make`` when ``env_fn`` is an id.
        seed: seeds the task draws of ``collect`` calls that give no ``seeds``.
    """

    def __init__(
        self,
        env_fn: Callable[[], gym.Env] | str,
        *,
        num_tasks: int = 1,
        group_size: int = 8,
        settings: RolloutSettings | None = None,
        env_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
    ):
        if num_tasks < 1 or group_size < 1:
            raise ValueError(f"num_tasks and group_size must be >= 1, got {num_tasks} and {group_size}")
        if isinstance(env_fn, str):
            env_id, kw = env_fn, dict(env_kwargs or {})
            env_fn = lambda: gym.make(env_id, **kw)  # noqa: E731
        self.settings = settings or RolloutSettings()
        self.runners = [GroupRunner(env_fn=env_fn, size=group_size) for _ in range(num_tasks)]
        self.group_size = group_size
        self.stats: dict[str, float] = {}
        self._rng = np.random.default_rng(seed)

    def collect(
        self,
        policy: Policy,
        *,
        seeds: Sequence[int | None] | None = None,
        task_indices: Sequence[int] | None = None,
        settings: RolloutSettings | None = None,
    ) -> list[Trajectory]:
        """Play one episode per env; return ``num_tasks * group_size`` trajectories,
        group-major (``Trajectory.group`` = task index in this call).

        Every env of a group is reset with the same seed (or ``task_index``), so the
        group shares one task; without ``seeds``/``task_indices`` fresh seeds are drawn
        from the collector's own generator.
        """
        s = settings or self.settings
        n = len(self.runners)
        if seeds is None and task_indices is None:
            seeds = [int(x) for x in self._rng.integers(0, 2**31 - 1, size=n)]
        if seeds is not None and len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for {n} tasks")
        if task_indices is not None and len(task_indices) != n:
            raise ValueError(f"got {len(task_indices)} task indices for {n} tasks")
        slots: list[EpisodeSlot] = []
        for g, runner in enumerate(self.runners):
            obs_list, infos = runner.reset(
                seed=None if seeds is None else seeds[g],
                task_index=None if task_indices is None else task_indices[g],
            )
            for i, (obs, info) in enumerate(zip(obs_list, infos)):
                system = s.system_prompt if s.system_prompt is not None else info.get("system_prompt")
                tools = list(info.get("tool_schemas") or []) if s.tool_schemas else []
                conv = Conversation(system=system, tools=tools or None)
                conv.add_observation(obs, turn=0, tool_result_role=s.tool_result_role)
                traj = Trajectory(task_id=str(info.get("task_id", "")), group=g)
                if seeds is not None:
                    traj.info["seed"] = seeds[g]
                slot = EpisodeSlot(group=g, index=i, env=runner.envs[i], conv=conv, traj=traj, obs=obs, info=dict(info))
                conv.meta.update(env=slot.env, obs=obs, info=slot.info)
                slots.append(slot)
        return play(policy, slots, self.runners, s, stats=self.stats)

    def close(self) -> None:
        for r in self.runners:
            r.close()


def play(policy: Policy, slots: list[EpisodeSlot], runners: Sequence[GroupRunner], s: RolloutSettings,
         *, stats: dict[str, float] | None = None) -> list[Trajectory]:
    """Run ``slots`` (already reset) to the end; see the module docstring."""
    stats = {} if stats is None else stats
    stats.update(policy_calls=0, generated_tokens=0, turns=0)
    call = 0
    while True:
        active = [sl for sl in slots if not sl.done]
        if not active:
            break
        sampling = s.sampling
        if sampling.seed is not None:  # a fresh, reproducible stream for every turn
            sampling = replace(sampling, seed=sampling.seed * 1_000_003 + call)
        call += 1
        gens = policy.generate([sl.conv for sl in active], sampling)
        if len(gens) != len(active):
            raise RuntimeError(f"policy returned {len(gens)} generations for {len(active)} conversations")
        stats["policy_calls"] += 1
        by_group: dict[int, dict[int, tuple[EpisodeSlot, Generation]]] = {}
        for sl, gen in zip(active, gens):
            stats["generated_tokens"] += len(gen.token_ids)
            if gen.finish_reason in ("error", "budget"):
                _end_without_step(sl, gen)
                continue
            by_group.setdefault(sl.group, {})[sl.index] = (sl, gen)
        for g, items in by_group.items():
            results = runners[g].step({i: gen.text for i, (_, gen) in items.items()})
            for i, (sl, gen) in items.items():
                _record_step(sl, gen, results[i], s)
                stats["turns"] += 1
    temp_fn = getattr(policy, "logprob_temperature", None)
    temperature = float(temp_fn(s.sampling)) if callable(temp_fn) else s.sampling.logprob_temperature
    for sl in slots:
        _finish(sl, temperature)
    return [sl.traj for sl in slots]


def collect_rollouts(policy: Policy, env_id: str, *, seeds: Sequence[int], group_size: int = 8,
                     settings: RolloutSettings | None = None, env_kwargs: dict[str, Any] | None = None) -> list[Trajectory]:
    """One-shot helper: ``len(seeds)`` tasks x ``group_size`` episodes of ``env_id``."""
    col = RolloutCollector(env_id, num_tasks=len(seeds), group_size=group_size, settings=settings, env_kwargs=env_kwargs)
    try:
        return col.collect(policy, seeds=list(seeds))
    finally:
        col.close()


def _record_step(sl: EpisodeSlot, gen: Generation, res: Any, s: RolloutSettings) -> None:
    obs, info = sl.obs, res.info
    turn = Turn(
        index=sl.turn,
        observation=str(obs.get("text", "")),
        action=gen.text,
        num_images=len(obs.get("images", ())),
        num_frames=len(obs.get("frames", ())),
        source=int(obs.get("source", 0)),
        reward=float(res.reward),
        reward_terms={k: float(v) for k, v in (info.get("reward_terms") or {}).items()},
        tool_calls=tuple(_tool_call(c) for c in info.get("tool_calls", ()) or ()),
        tool_errors=tuple(info.get("tool_errors", ()) or ()),
        parse_error=info.get("parse_error"),
        state_key=info.get("state_key"),
        images=(tuple(obs.get("images", ())) + tuple(obs.get("frames", ()))) if s.keep_images else (),
    )
    sl.traj.turns.append(turn)
    if gen.finish_reason == "length":
        sl.traj.info["truncated_replies"] = sl.traj.info.get("truncated_replies", 0) + 1
    sl.conv.add_action(gen.text)
    sl.turn += 1
    if res.done:
        sl.done = True
        sl.traj.success = bool(info.get("success", False))
        sl.traj.score = float(info.get("score", 0.0))
        sl.traj.termination_reason = str(info.get("termination_reason", "") or ("max_turns" if res.truncated else ""))
        sl.traj.info["final_text"] = str(res.obs.get("text", ""))
        if "metrics" in info:
            sl.traj.info["metrics"] = info["metrics"]
        return
    if s.max_turns is not None and sl.turn >= s.max_turns:
        sl.done = True
        sl.traj.termination_reason = "max_turns"
        sl.traj.info["final_text"] = str(res.obs.get("text", ""))
        return
    sl.obs = res.obs
    sl.info.update(info)
    sl.conv.add_observation(res.obs, turn=sl.turn, tool_result_role=s.tool_result_role)
    sl.conv.meta.update(obs=res.obs, info=sl.info)


def _end_without_step(sl: EpisodeSlot, gen: Generation) -> None:
    """The policy could not reply (rejected input or full context): end the episode."""
    sl.done = True
    if gen.finish_reason == "error":
        sl.traj.error = gen.error
        sl.traj.termination_reason = "env_error"
    else:
        sl.traj.termination_reason = "budget"
        sl.traj.info["budget"] = gen.error
    logger.info("episode %s (group %d) ended without a reply: %s", sl.traj.task_id, sl.group, gen.error)


def _finish(sl: EpisodeSlot, temperature: float) -> None:
    state = sl.conv.state
    if isinstance(state, TokenState):
        state.fill_trajectory(sl.traj)
        sl.traj.info[TEMPERATURE_KEY] = temperature
    sl.traj.dropped_turns = max(sl.traj.dropped_turns, sl.conv.dropped_turns)
    sl.conv.meta.clear()  # drop env references; the trajectory is self-contained


def _tool_call(c: Any) -> ToolCall:
    if isinstance(c, ToolCall):
        return c
    return ToolCall(name=str(c.get("name", "")), arguments=dict(c.get("arguments", {}) or {}), raw=str(c.get("raw", "")))
