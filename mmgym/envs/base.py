"""``MMEnv``: the base class every single-agent mmgym environment builds on.

A new environment writes only four things: task sampling (``sample_task``), its first
observation (``initial_observation``), its tools (``make_tools`` / ``tool_state``) and its
verification (``verify``). The base class owns parsing, tool dispatch with schema
validation, the invalid-output budget, turn limits, reward rubrics and the observation
and info contract of DESIGN §2.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from mmgym.core import RGBImage, ToolCall, ToolResult, UnicodeText
from mmgym.core.text import tags_balanced
from mmgym.rewards import RUBRICS, RewardContext, Rubric
from mmgym.tools import PARSERS, Tool, ToolParser, run_tool, tool_schema

__all__ = ["MMEnv", "Task", "Verdict", "make_observation_space", "SOURCE_TASK", "SOURCE_TOOL", "SOURCE_FEEDBACK"]

SOURCE_TASK, SOURCE_TOOL, SOURCE_FEEDBACK = 0, 1, 2
MAX_TEXT = 65_536
MAX_ACTION = 65_536


def make_observation_space(max_turns: int, max_side: int = 8192) -> spaces.Dict:
    """The observation space of DESIGN §2 (every key always present)."""
    return spaces.Dict(
        {
            "text": UnicodeText(MAX_TEXT),
            "images": spaces.Sequence(RGBImage(max_side), stack=False),
            "frames": spaces.Sequence(RGBImage(max_side), stack=False),
            "frame_times": spaces.Sequence(spaces.Box(0.0, np.inf, shape=(), dtype=np.float32), stack=False),
            "source": spaces.Discrete(3),
            "turn": spaces.Discrete(max_turns + 1),
        }
    )


@dataclass(slots=True)
class Task:
    """A generic task record; envs may subclass it or attach fields through ``data``.

    ``prompt`` holds one ``<image>`` per entry in ``images`` (and ``<video>`` before frames).
    """

    task_id: str
    prompt: str
    images: tuple[np.ndarray, ...] = ()
    frames: tuple[np.ndarray, ...] = ()
    frame_times: tuple[float, ...] = ()
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Verdict:
    """An env's verification of a final answer: accuracy in [0, 1] plus diagnostics."""

    accuracy: float
    metrics: dict[str, float] = field(default_factory=dict)


class MMEnv(gym.Env[dict, str]):
    """Base class. Subclasses implement ``sample_task``, ``initial_observation`` (optional,
    default: the task's prompt and media), ``make_tools``, ``verify`` and ``oracle_action``.

    Args:
        max_turns: assistant turns before the episode is truncated.
        max_invalid: malformed replies tolerated; one more ends the episode.
        max_calls_per_turn: tool calls executed per reply (extra calls are reported, not run).
        invalid_penalty: the ``format`` term given for a malformed reply (as a negative reward).
        rubric: a ``Rubric`` or the name of a preset in ``mmgym.rewards.RUBRICS``.
        parser: name of a tool-call format in ``mmgym.tools.PARSERS``.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": 1}
    description: ClassVar[str] = ""

    def __init__(
        self,
        *,
        max_turns: int = 4,
        max_invalid: int = 2,
        max_calls_per_turn: int = 1,
        invalid_penalty: float = 0.1,
        rubric: str | Rubric = "accuracy",
        parser: str = "hermes",
        render_mode: str | None = None,
    ):
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        if max_invalid < 0:
            raise ValueError(f"max_invalid must be >= 0, got {max_invalid}")
        if max_calls_per_turn < 1:
            raise ValueError(f"max_calls_per_turn must be >= 1, got {max_calls_per_turn}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode {render_mode!r} not supported; use one of {self.metadata['render_modes']}")
        self.max_turns = int(max_turns)
        self.max_invalid = int(max_invalid)
        self.max_calls_per_turn = int(max_calls_per_turn)
        self.invalid_penalty = float(invalid_penalty)
        self.rubric: Rubric = RUBRICS.get(rubric)() if isinstance(rubric, str) else rubric
        self.parser: ToolParser = PARSERS.get(parser)()
        self.render_mode = render_mode
        self.observation_space = make_observation_space(self.max_turns)
        self.action_space = UnicodeText(MAX_ACTION)
        self.tools: dict[str, Tool] = {t.name: t for t in self.make_tools()}
        self._schemas = [tool_schema(t) for t in self.tools.values()]
        self.task: Any = None
        self._reset_episode_state()

    # ------------------------------------------------------------------ hooks
    def sample_task(self, rng: np.random.Generator, index: int | None) -> Task:
        """Draw a task with ``rng`` (never a global RNG); ``index`` selects a fixed task.
        Every subclass writes this (see the README's custom-env example)."""
        raise NotImplementedError(f"{type(self).__name__} must define sample_task(rng, index) -> Task")

    def make_tools(self) -> list[Tool]:
        """The tools of this env (stateless objects; per-episode state comes from ``tool_state``)."""
        return []

    def tool_state(self, task: Any) -> Any:
        """Per-episode state handed to every tool call."""
        return None

    def initial_observation(self, task: Task) -> ToolResult:
        return ToolResult(text=task.prompt, images=task.images, frames=task.frames, frame_times=task.frame_times)

    def verify(self, task: Any, answer: str) -> Verdict:
        """Score the final ``answer`` of ``task``. Every subclass that takes answers writes this."""
        raise NotImplementedError(f"{type(self).__name__} must define verify(task, answer) -> Verdict")

    def turn_terms(self, calls: list[ToolCall], results: list[ToolResult]) -> dict[str, float]:
        """Turn-level reward terms earned by this turn's tool calls (default: none)."""
        return {}

    def goal_verdict(self) -> Verdict | None:
        """Called after a turn's tool calls ran: a ``Verdict`` ends the episode with reason
        ``goal`` and scores the outcome with it (for tasks finished by a tool call rather
        than an ``<answer>``, e.g. a triage referral). Default: ``None``, the episode goes on."""
        return None

    def goal_reason(self, verdict: Verdict) -> str:
        """``termination_reason`` of an episode ended by ``goal_verdict``: ``"goal"`` (default)
        or ``"failure"`` (e.g. a ``done()`` call with the task not achieved)."""
        return "goal"

    def oracle_action(self) -> str:
        """The reply a perfect agent gives now (may read the ground truth). Optional: the
        oracle agent, demonstrations and ``check_mm_env``'s oracle run need it."""
        raise NotImplementedError(f"{type(self).__name__} has no oracle: define oracle_action() -> str")

    def num_tasks(self) -> int | None:
        """Number of fixed tasks (dataset rows), or ``None`` for an unbounded generator."""
        return None

    def gold_tool_calls(self) -> list[list[ToolCall]] | None:
        """The gold tool calls of the current task, one list per turn that calls tools (in
        order), or ``None`` (default): this env or task has none. Called once per ``reset``,
        after the task is drawn; the reset info carries them as ``gold_tool_calls`` (JSON:
        lists of ``{"name", "arguments"}``) for estimators that match calls, e.g. MatchTIR."""
        return None

    # ------------------------------------------------------------------ gym API
    def _reset_episode_state(self) -> None:
        self._turn = 0
        self._num_invalid = 0
        self._tags_ok = True
        self._used_tool = False
        self._num_calls = 0
        self._history: list[str] = []
        self._key_hash = hashlib.blake2b(digest_size=8)
        self._key_task: Any = None
        self._done = False
        self._state = None
        self._last_images: tuple[np.ndarray, ...] = ()
        self._metrics: dict[str, float] = {}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        options = dict(options or {})
        index = options.get("task_index")
        if index is not None:
            if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
                raise ValueError(f"options['task_index'] must be a non-negative int, got {index!r}")
            n = self.num_tasks()
            if n is not None and index >= n:
                raise ValueError(f"options['task_index']={index} out of range: this env has {n} tasks")
            index = int(index)
        self._reset_episode_state()
        self.task = self.sample_task(self.np_random, index)
        self._state = self.tool_state(self.task)
        first = self.initial_observation(self.task)
        obs = self._obs(first.text, first.images, first.frames, first.frame_times, SOURCE_TASK)
        info = {"task_id": self.task.task_id, "tool_schemas": self._schemas, "max_turns": self.max_turns, "state_key": self.state_key()}
        gold = self.gold_tool_calls()
        if gold is not None:
            info["gold_tool_calls"] = [[c.to_json() for c in calls] for calls in gold]
        return obs, info

    def step(self, action: str) -> tuple[dict, float, bool, bool, dict]:
        if self.task is None:
            raise RuntimeError("call reset() before step()")
        if self._done:
            raise RuntimeError("the episode is over; call reset()")
        state_key = self.state_key()
        text = action if isinstance(action, str) else ""
        parsed = self.parser.parse(text) if isinstance(action, str) else None
        terms: dict[str, float] = {}
        info: dict[str, Any] = {"tool_calls": [], "parse_error": None, "tool_errors": [], "state_key": state_key}
        terminated = truncated = False
        reason = ""
        self._turn += 1
        self._tags_ok &= tags_balanced(text)
        if parsed is None or parsed.error is not None:
            err = parsed.error if parsed is not None else f"the action must be a str, got {type(action).__name__}"
            self._num_invalid += 1
            info["parse_error"] = err
            terms["format"] = -self.invalid_penalty
            obs_parts = (f"Invalid reply: {err}. {self.parser.instructions()}", (), (), (), SOURCE_FEEDBACK)
            if self._num_invalid > self.max_invalid:
                terminated, reason = True, "max_invalid"
        elif parsed.answer is not None:
            verdict = self.verify(self.task, parsed.answer)
            self._metrics.update(verdict.metrics)
            terms.update(self._outcome_terms(parsed.answer, verdict, format_ok=parsed.format_ok))
            terminated, reason = True, "answer"
            obs_parts = ("", (), (), (), SOURCE_FEEDBACK)
        else:
            obs_parts, turn_terms = self._run_calls(parsed.tool_calls, info)
            terms.update(turn_terms)
            goal = self.goal_verdict()
            if goal is not None:
                self._metrics.update(goal.metrics)
                for k, v in self._outcome_terms(None, goal, format_ok=parsed.format_ok).items():
                    terms[k] = terms.get(k, 0.0) + v
                terminated, reason = True, self.goal_reason(goal)
        if not terminated and self._turn >= self.max_turns:
            truncated, reason = True, "max_turns"
        if (terminated or truncated) and reason not in ("answer", "goal", "failure"):
            for k, v in self._outcome_terms(None, Verdict(0.0), format_ok=False).items():
                terms[k] = terms.get(k, 0.0) + v
        obs = self._obs(*obs_parts)
        reward = float(sum(terms.values()))
        info["reward_terms"] = terms
        info["num_invalid"] = self._num_invalid
        if terminated or truncated:
            self._done = True
            acc = float(self._metrics.get("accuracy", 0.0))
            info.update(success=bool(acc >= 1.0), score=acc, termination_reason=reason, metrics=dict(self._metrics))
        return obs, reward, bool(terminated), bool(truncated), info

    # ------------------------------------------------------------------ helpers
    def _run_calls(self, calls: list[ToolCall], info: dict[str, Any]) -> tuple[tuple, dict[str, float]]:
        texts: list[str] = []
        images: list[np.ndarray] = []
        frames: list[np.ndarray] = []
        times: list[float] = []
        results: list[ToolResult] = []
        run = calls[: self.max_calls_per_turn]
        for call in run:
            tool = self.tools.get(call.name)
            if tool is None:
                res = ToolResult.fail(f"unknown tool '{call.name[:80]}'; available: {', '.join(self.tools) or 'none'}")
            else:
                res = run_tool(tool, self._state, call)
            results.append(res)
            info["tool_calls"].append(call.to_json())
            self._num_calls += 1
            if res.error is not None:
                info["tool_errors"].append(res.error)
                texts.append(f"Tool error ({call.name[:80]}): {res.error}")
                continue
            self._used_tool = True
            item = json.dumps(call.to_json(), sort_keys=True)
            self._history.append(item)
            self._key_hash.update(b"|" + item.encode())
            texts.append(res.text)
            images.extend(res.images)
            frames.extend(res.frames)
            times.extend(res.frame_times)
            self._metrics.update(res.metrics)
        if len(calls) > len(run):
            texts.append(f"Only {self.max_calls_per_turn} tool call(s) per turn are run; {len(calls) - len(run)} ignored.")
        terms = self.turn_terms(run, results)
        return ("\n".join(texts), tuple(images), tuple(frames), tuple(times), SOURCE_TOOL), terms

    @staticmethod
    def _fix_placeholders(text: str, n_images: int) -> str:
        have = text.count("<image>")
        if have > n_images:
            text = text.replace("<image>", "[image]")
            have = 0
        return text + "".join(" <image>" for _ in range(n_images - have))

    def _outcome_terms(self, answer: str | None, verdict: Verdict, *, format_ok: bool) -> dict[str, float]:
        self._metrics["accuracy"] = float(verdict.accuracy)
        ctx = RewardContext(
            answer=answer,
            accuracy=float(verdict.accuracy),
            format_ok=format_ok,
            tags_ok=self._tags_ok,
            used_tool=self._used_tool,
            num_tool_calls=self._num_calls,
            num_invalid=self._num_invalid,
            answer_chars=len(answer or ""),
            metrics=dict(self._metrics),
        )
        return self.rubric.score(ctx)

    def _obs(self, text: str, images: tuple, frames: tuple, frame_times: tuple, source: int) -> dict[str, Any]:
        # One <image> per image, whatever the text holds: model-written names quoted in
        # feedback must not forge placeholders, and a tool may omit its own.
        images = tuple(np.ascontiguousarray(i, dtype=np.uint8) for i in images)
        text = self._fix_placeholders(text[: MAX_TEXT - 8 * len(images)], len(images))
        if images:
            self._last_images = images
        return {
            "text": text,
            "images": images,
            "frames": tuple(np.ascontiguousarray(f, dtype=np.uint8) for f in frames),
            "frame_times": tuple(np.asarray(t, dtype=np.float32) for t in frame_times),
            "source": int(source),
            "turn": int(min(self._turn, self.max_turns)),
        }

    def state_key(self) -> str:
        """Anchor-state key for GiGPO step grouping: the task plus the valid tool calls so far."""
        if self._key_task is not self.task:  # seed the running hash with the task once per episode
            self._key_task = self.task
            self._key_hash = hashlib.blake2b(str(getattr(self.task, "task_id", "")).encode(), digest_size=8)
            for item in self._history:
                self._key_hash.update(b"|" + item.encode())
        return self._key_hash.hexdigest()

    def render(self) -> np.ndarray | None:
        if self.render_mode == "rgb_array":
            return self._last_images[-1] if self._last_images else np.zeros((8, 8, 3), np.uint8)
        return None

    @property
    def tool_schemas(self) -> list[dict[str, Any]]:
        return self._schemas
