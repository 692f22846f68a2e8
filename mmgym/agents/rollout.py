"""Multi-turn group rollouts: N tasks x G episodes, one policy call per turn.

Each turn, every still-running episode of every group is batched into one
``policy.generate`` call; each env is stepped with its reply; episodes finish at their
own turn and leave the batch (finished episodes cost no more model compute).
Everything is recorded in ``Trajectory`` records: per-turn observations, replies,
rewards, reward terms, tool calls and ``state_key`` (GiGPO anchor states), and for
model policies the exact token sequence with action mask and sampler log-probs
(``mmgym.agents.tokens``), ready for ``build_rollout_batch``.

With ``backend="process"`` (or ``"ray"``) the envs live in an env worker pool
(``mmgym.envs.pool``): each turn's actions are submitted as soon as the policy call returns
and the results gathered as they arrive, so env steps of different episodes overlap in
the workers. An env that fails (raises, hangs past ``step_timeout_s``, crashes its worker)
ends only its own episode, with ``termination_reason="env_error"``,
``Trajectory.error`` and ``Trajectory.info["env_error"]`` (the fault kind) set.

>>> import gymnasium as gym, mmgym
>>> from mmgym.agents import RolloutCollector, ScriptedPolicy
>>> col = RolloutCollector(lambda: gym.make("mmgym/ChainOfFocus-v0"), num_tasks=1, group_size=2)
>>> trajs = col.collect(ScriptedPolicy(lambda conv: "<answer>A</answer>"), seeds=[0])
>>> len(trajs), trajs[0].termination_reason
(2, 'answer')
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import gymnasium as gym
import numpy as np

from mmgym.agents.chat import Conversation
from mmgym.agents.episodes import new_trajectory
from mmgym.agents.policy import Generation, Policy, SamplingParams
from mmgym.agents.tokens import TEMPERATURE_KEY, TokenState
from mmgym.core import ToolCall, Trajectory, Turn
from mmgym.core.image_stats import visual_entropy
from mmgym.envs.pool import BACKENDS, BasePool, PoolResult, error_observation, make_pool
from mmgym.envs.runner import GroupRunner

__all__ = ["RolloutSettings", "RolloutCollector", "EpisodeSlot", "collect_rollouts", "play", "play_pool"]

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
    visual_entropy: record ``Trajectory.info["visual_entropy"]``, the grey-level entropy
        (``mmgym.algos.visual_entropy``) of the first observation's first image, at reset
        (so it is there with ``keep_images=False``); Durian's difficulty reads it.
    """

    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_turns: int | None = None
    system_prompt: str | None = None
    tool_result_role: Literal["user", "tool"] = "user"
    keep_images: bool = True
    tool_schemas: bool = True
    visual_entropy: bool = False

    def __post_init__(self) -> None:
        if self.max_turns is not None and self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1 or None, got {self.max_turns}")


@dataclass(slots=True)
class EpisodeSlot:
    """One running episode: its env (inside a group), conversation and record.

    ``env`` is the in-process env (``None`` when it lives in a worker pool; ``env_index``
    is then its index in the pool).
    """

    group: int
    index: int  # env index inside its group
    env: gym.Env | None
    conv: Conversation
    traj: Trajectory
    obs: dict[str, Any]
    info: dict[str, Any]
    turn: int = 0
    done: bool = False
    env_index: int | None = None


class RolloutCollector:
    """Holds ``num_tasks`` groups of ``group_size`` envs and plays them with a policy.

    Args:
        env_fn: builds one env (e.g. ``lambda: gym.make("mmgym/ChainOfFocus-v0")``), or
            an env id string for ``gymnasium.make`` (required with a pool backend).
        num_tasks: groups (distinct tasks) per ``collect`` call.
        group_size: episodes per task (G of GRPO).
        settings: see ``RolloutSettings``.
        env_kwargs: keyword arguments for ``gymnasium.make`` when ``env_fn`` is an id.
        seed: seeds the task draws of ``collect`` calls that give no ``seeds``.
        backend: ``"local"`` (default): the envs live in this process (``GroupRunner``s);
            ``"process"`` or ``"ray"``: one env worker pool of ``num_tasks * group_size``
            envs (``mmgym.envs.pool.make_pool``). Scripted agents that read the env object
            (``conv.meta["env"]``, e.g. the oracle) need ``"local"``: with a pool it is None.
        pool_kwargs: keyword arguments for ``make_pool`` (``num_workers``,
            ``step_timeout_s``, ``on_error``, ``address`` for Ray, ...).
        pool: an already built pool of ``num_tasks * group_size`` envs to play on instead
            (e.g. envs from custom factories); the collector closes it in ``close``.
    """

    def __init__(
        self,
        env_fn: Callable[[], gym.Env] | str | None,
        *,
        num_tasks: int = 1,
        group_size: int = 8,
        settings: RolloutSettings | None = None,
        env_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
        backend: str = "local",
        pool_kwargs: dict[str, Any] | None = None,
        pool: BasePool | None = None,
    ):
        if num_tasks < 1 or group_size < 1:
            raise ValueError(f"num_tasks and group_size must be >= 1, got {num_tasks} and {group_size}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown rollout backend {backend!r}; known: {', '.join(BACKENDS)}")
        self.settings = settings or RolloutSettings()
        self.group_size = group_size
        self.num_tasks = num_tasks
        self.stats: dict[str, float] = {}
        self._rng = np.random.default_rng(seed)
        self.runners: list[GroupRunner] = []
        self.pool: BasePool | None = None
        n = num_tasks * group_size
        if pool is not None:
            if len(pool) != n:
                raise ValueError(f"the pool has {len(pool)} envs; num_tasks * group_size = {num_tasks} * {group_size} = {n} are needed")
            self.pool = pool
        elif backend != "local":
            if not isinstance(env_fn, str):
                raise ValueError(f"backend={backend!r} builds its envs in worker processes from an env id: give env_fn "
                                 f"as a registered id string (e.g. 'mmgym/ChainOfFocus-v0') plus env_kwargs, not "
                                 f"{type(env_fn).__name__}; or build the pool yourself and pass pool=")
            self.pool = make_pool(backend, env_fn, n, env_kwargs=dict(env_kwargs or {}), **dict(pool_kwargs or {}))
        else:
            if env_fn is None:
                raise ValueError("RolloutCollector needs env_fn (an env factory or id), or pool=")
            if isinstance(env_fn, str):
                env_id, kw = env_fn, dict(env_kwargs or {})
                env_fn = lambda: gym.make(env_id, **kw)  # noqa: E731
            self.runners = [GroupRunner(env_fn=env_fn, size=group_size) for _ in range(num_tasks)]

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
        n = self.num_tasks
        if seeds is None and task_indices is None:
            seeds = [int(x) for x in self._rng.integers(0, 2**31 - 1, size=n)]
        if seeds is not None and len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for {n} tasks")
        if task_indices is not None and len(task_indices) != n:
            raise ValueError(f"got {len(task_indices)} task indices for {n} tasks")
        if self.pool is not None:
            return self._collect_pool(policy, seeds, task_indices, s)
        slots: list[EpisodeSlot] = []
        for g, runner in enumerate(self.runners):
            obs_list, infos = runner.reset(
                seed=None if seeds is None else seeds[g],
                task_index=None if task_indices is None else task_indices[g],
            )
            for i, (obs, info) in enumerate(zip(obs_list, infos)):
                slots.append(_start_slot(s, g, i, obs, info, None if seeds is None else seeds[g], env=runner.envs[i]))
        return play(policy, slots, self.runners, s, stats=self.stats)

    def _collect_pool(self, policy: Policy, seeds: Sequence[int | None] | None, task_indices: Sequence[int] | None,
                      s: RolloutSettings) -> list[Trajectory]:
        """``collect`` on the pool: reset every env of a group to one task, then ``play_pool``."""
        pool, G = self.pool, self.group_size
        assert pool is not None
        _drain(pool)  # requests left in flight by an interrupted call
        for g in range(self.num_tasks):
            seed = None if seeds is None else seeds[g]
            task_index = None if task_indices is None else task_indices[g]
            if task_index is None and seed is None:  # as GroupRunner.reset: one fresh seed per group
                seed = int(np.random.SeedSequence().generate_state(1)[0] >> 1)
            options = None if task_index is None else {"task_index": task_index}
            for i in range(G):
                pool.submit_reset(g * G + i, seed=seed, options=options)
        resets = pool.wait(range(self.num_tasks * G))
        slots: list[EpisodeSlot] = []
        for g in range(self.num_tasks):
            for i in range(G):
                k = g * G + i
                res = resets[k]
                seed = None if seeds is None else seeds[g]
                if res.error is None:  # no in-process env with a pool: conv.meta["env"] is None
                    slots.append(_start_slot(s, g, i, res.obs or error_observation(), res.info, seed, env_index=k))
                    continue
                slot = EpisodeSlot(group=g, index=i, env=None, conv=Conversation(), obs=res.obs or error_observation(), info=dict(res.info),
                                   traj=new_trajectory(res.info, group=g, seed=seed), env_index=k)
                _mark_env_error(slot, res)  # the episode never started
                slots.append(slot)
        return play_pool(policy, slots, pool, s, stats=self.stats)

    def close(self) -> None:
        for r in self.runners:
            r.close()
        if self.pool is not None:
            self.pool.close()


def _start_slot(s: RolloutSettings, group: int, index: int, obs: dict[str, Any], info: dict[str, Any], seed: int | None,
                *, env: gym.Env | None = None, env_index: int | None = None) -> EpisodeSlot:
    """An episode after its reset: the conversation opened with the first observation (the
    env's system prompt unless the settings give one; its tool schemas when asked for)."""
    system = s.system_prompt if s.system_prompt is not None else info.get("system_prompt")
    tools = list(info.get("tool_schemas") or []) if s.tool_schemas else []
    conv = Conversation(system=system, tools=tools or None)
    conv.add_observation(obs, turn=0, tool_result_role=s.tool_result_role)
    slot = EpisodeSlot(group=group, index=index, env=env, conv=conv, traj=new_trajectory(info, group=group, seed=seed), obs=obs,
                       info=dict(info), env_index=env_index)
    images = obs.get("images", ())
    if s.visual_entropy and len(images):
        slot.traj.info["visual_entropy"] = visual_entropy(images[0])
    conv.meta.update(env=env, obs=obs, info=slot.info)
    return slot


def _generate_steps(policy: Policy, active: list[EpisodeSlot], s: RolloutSettings, call: int,
                    stats: dict[str, float]) -> list[tuple[EpisodeSlot, Generation]]:
    """One policy call for ``active``; episodes whose generation failed or ran out of budget
    end here, the others come back paired with their generation, to be stepped."""
    ready = []
    for sl, gen in zip(active, _generate(policy, active, s, call, stats)):
        stats["generated_tokens"] += len(gen.token_ids)
        if gen.finish_reason in ("error", "budget"):
            _end_without_step(sl, gen)
        else:
            ready.append((sl, gen))
    return ready


def _turns(policy: Policy, slots: list[EpisodeSlot], s: RolloutSettings,
           stats: dict[str, float]) -> Iterator[list[tuple[EpisodeSlot, Generation]]]:
    """Until every episode is done: one policy call per turn, yielding what to step."""
    call = 0
    while active := [sl for sl in slots if not sl.done]:
        yield _generate_steps(policy, active, s, call, stats)
        call += 1


def play(policy: Policy, slots: list[EpisodeSlot], runners: Sequence[GroupRunner], s: RolloutSettings,
         *, stats: dict[str, float] | None = None) -> list[Trajectory]:
    """Run ``slots`` (already reset) to the end; see the module docstring."""
    stats = {} if stats is None else stats
    stats.update(policy_calls=0, generated_tokens=0, turns=0)
    for ready in _turns(policy, slots, s, stats):
        by_group: dict[int, dict[int, tuple[EpisodeSlot, Generation]]] = {}
        for sl, gen in ready:
            by_group.setdefault(sl.group, {})[sl.index] = (sl, gen)
        for g, items in by_group.items():
            results = runners[g].step({i: gen.text for i, (_, gen) in items.items()})
            for i, (sl, gen) in items.items():
                _record_step(sl, gen, results[i], s)
                stats["turns"] += 1
    return _finish_all(policy, slots, s)


def play_pool(policy: Policy, slots: list[EpisodeSlot], pool: BasePool, s: RolloutSettings,
              *, stats: dict[str, float] | None = None) -> list[Trajectory]:
    """``play`` with the envs in ``pool`` (env ``slot.env_index``): each turn's actions are
    submitted as soon as the policy call returns and recorded as their results arrive.

    A result with ``error`` set ends its episode (``termination_reason="env_error"``,
    ``Trajectory.error``, ``info["env_error"]``); the other episodes go on.
    """
    stats = {} if stats is None else stats
    stats.update(policy_calls=0, generated_tokens=0, turns=0, env_errors=sum(bool(sl.traj.info.get("env_error")) for sl in slots))
    for ready in _turns(policy, slots, s, stats):
        waiting: dict[int, tuple[EpisodeSlot, Generation]] = {}
        for sl, gen in ready:
            assert sl.env_index is not None
            pool.submit(sl.env_index, gen.text)
            waiting[sl.env_index] = (sl, gen)
        for k, res in pool.wait(waiting).items():  # in arrival order
            sl, gen = waiting[k]
            _record_step(sl, gen, res, s)
            stats["turns"] += 1
            if res.error is not None:
                _mark_env_error(sl, res)
                stats["env_errors"] += 1
    return _finish_all(policy, slots, s)


def _generate(policy: Policy, active: list[EpisodeSlot], s: RolloutSettings, call: int, stats: dict[str, float]) -> list[Generation]:
    """One batched policy call over the ``active`` episodes (the ``call``-th of this rollout)."""
    sampling = s.sampling
    if sampling.seed is not None:  # a fresh, reproducible stream for every turn
        sampling = replace(sampling, seed=sampling.seed * 1_000_003 + call)
    gens = policy.generate([sl.conv for sl in active], sampling)
    if len(gens) != len(active):
        raise RuntimeError(f"policy returned {len(gens)} generations for {len(active)} conversations")
    stats["policy_calls"] += 1
    return gens


def _finish_all(policy: Policy, slots: list[EpisodeSlot], s: RolloutSettings) -> list[Trajectory]:
    temp_fn = getattr(policy, "logprob_temperature", None)
    temperature = float(temp_fn(s.sampling)) if callable(temp_fn) else s.sampling.logprob_temperature
    for sl in slots:
        _finish(sl, temperature)
    return [sl.traj for sl in slots]


def _drain(pool: BasePool) -> None:
    """Wait out (and drop) requests still in flight, e.g. after a policy call raised."""
    while pool.pending():
        for k, res in pool.poll(timeout=None):
            logger.info("env pool: dropped a stale %s result for env %d", res.op, k)


def _mark_env_error(sl: EpisodeSlot, res: PoolResult) -> None:
    """The env failed (``res.error`` set): end the episode as ``env_error``."""
    sl.done = True
    sl.traj.error = res.error
    sl.traj.termination_reason = "env_error"
    sl.traj.success, sl.traj.score = False, 0.0
    sl.traj.info["env_error"] = str(res.info.get("env_error") or "env_error")
    logger.warning("episode %s (group %d, env %s) ended by an env failure: %s", sl.traj.task_id, sl.group, sl.env_index, res.error)


def collect_rollouts(policy: Policy, env_id: str, *, seeds: Sequence[int], group_size: int = 8,
                     settings: RolloutSettings | None = None, env_kwargs: dict[str, Any] | None = None,
                     backend: str = "local", pool_kwargs: dict[str, Any] | None = None) -> list[Trajectory]:
    """One-shot helper: ``len(seeds)`` tasks x ``group_size`` episodes of ``env_id`` (on
    ``backend``, see ``RolloutCollector``)."""
    col = RolloutCollector(env_id, num_tasks=len(seeds), group_size=group_size, settings=settings, env_kwargs=env_kwargs,
                           backend=backend, pool_kwargs=pool_kwargs)
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
