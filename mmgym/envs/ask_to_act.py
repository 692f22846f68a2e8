"""``mmgym/AskToAct-v0``: fetch one object under an under-specified instruction, asking the
user clarifying questions only when needed (Ask-to-Act: "Grounding Multimodal LLMs to
Embodied Agents that Ask for Help with Reinforcement Learning").

The instruction names a category ("Bring me the cup and put it on the bedroom desk"); the
house holds several instances that differ by colour, size or location (the ambiguity types
of the paper, see ``ask_to_act_world``), and one of them is the hidden target. The agent
sees a top-down map, gets an egocentric close-up of a receptacle when it navigates there,
and acts with tools: ``navigate(receptacle)``, ``pick(object_id)``, ``place(receptacle)``,
``ask(question)`` and ``done()``.

Reward: ``+1`` for the target on the goal receptacle at ``done()`` (the ``ask_to_act``
rubric); a turn-level ``question`` cost for every question beyond the minimum needed to
single out the target (computed from the candidate set); a turn-level ``wrong_pick``
penalty for picking anything but the target; the step cap is ``max_turns``.

Scripted players (``(env, rng) -> str``): ``minimal_ask`` (the env's oracle: asks exactly
the minimum), ``never_ask`` (guesses uniformly among the candidates) and ``always_ask``
(asks about colour, size and location, then acts). See ``benchmarks/ask_to_act_baselines.py``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmgym.core import ToolCall, ToolResult
from mmgym.envs.ask_to_act_user import DONT_UNDERSTAND, MAX_QUESTION_CHARS, RuleBasedUser, UserFn, classify_question
from mmgym.envs.ask_to_act_world import (
    AMBIGUITY_TYPES, CATEGORIES, KINDS, SLOTS, Obj, Scene, generate_scene, render_map, render_view, target_description,
)
from mmgym.envs.base import MMEnv, Task, Verdict
from mmgym.rewards import RUBRICS, RewardContext, RewardFn, Rubric

__all__ = ["AskState", "AskTask", "AskToActEnv", "BASELINES", "always_ask", "ask_to_act_rubric", "minimal_ask", "never_ask", "play_episode"]

logger = logging.getLogger(__name__)

QUESTIONS = {"color": "What color is the {}?", "size": "What size is the {}?", "location": "Where is the {}?"}
MAX_ANSWER_CHARS = 1000
_SALT = 0xA5C7


def _success(ctx: RewardContext) -> float:
    return float(ctx.accuracy)


def ask_to_act_rubric() -> Rubric:
    """Ask-to-Act outcome reward: ``1.0 * success`` (question costs and wrong-pick penalties
    are turn-level terms paid by the env when they are earned)."""
    return Rubric([RewardFn("success", 1.0, _success)])


RUBRICS.register("ask_to_act", ask_to_act_rubric)


@dataclass(slots=True)
class AskTask(Task):
    scene: Scene | None = None


@dataclass(slots=True)
class AskState:
    """Per-episode state the tools share. ``revealed`` holds the attribute kinds the user
    was asked about; ``events`` queues ``("question", n)`` / ``("wrong_pick", oid)`` for
    the env's turn-level reward."""

    scene: Scene
    objects: dict[str, Obj]
    user: UserFn
    view_size: int = 128
    describe: bool = False
    location: str | None = None
    holding: str | None = None
    questions: int = 0
    revealed: set[str] = field(default_factory=set)
    wrong_picks: int = 0
    finished: bool = False
    events: list[tuple[str, Any]] = field(default_factory=list)

    def resolve_receptacle(self, name: Any) -> str | None:
        """``"kitchen_counter"``, ``"Kitchen counter"``, ``"the kitchen counter"`` or its map number."""
        key = re.sub(r"[\s_\-]+", " ", str(name).strip().lower())
        key = key[4:] if key.startswith("the ") else key
        for rid, rec in self.scene.receptacles.items():
            if key in (rec.name, str(rec.index)):
                return rid
        return None

    def resolve_object(self, oid: Any) -> str | None:
        m = re.fullmatch(r"(?:obj[\s_\-]*)?(\d{1,6})", str(oid).strip().lower())
        key = f"obj_{int(m.group(1))}" if m else None
        return key if key in self.objects else None

    def here(self) -> list[str]:
        return [o.oid for o in self.objects.values() if self.location is not None and o.receptacle == self.location]

    def view(self, rid: str) -> ToolResult:
        rec = self.scene.receptacles[rid]
        objs = self.here()
        if self.describe:
            listed = ", ".join(f"{o} ({self.objects[o].describe()})" for o in objs)
        else:
            listed = ", ".join(objs)
        held = f" You are holding {self.holding}." if self.holding else ""
        text = f"You are at the {rec.name} ({rid}). " + (f"Objects here: {listed}." if objs else "Nothing is on it.") + held + " <image>"
        return ToolResult(text=text, images=(render_view(self.scene, self.objects, rid, self.view_size),))


def _busy(state: AskState) -> ToolResult | None:
    return ToolResult.fail("the episode is over (done() was called)") if state.finished else None


class NavigateTool:
    name = "navigate"
    description = "Go to a receptacle (by name, e.g. 'kitchen_counter', or its number on the map) and look at it close up."
    parameters = {"type": "object", "properties": {"receptacle": {"type": ["string", "integer"]}}, "required": ["receptacle"], "additionalProperties": False}

    def __call__(self, state: AskState, receptacle: str | int) -> ToolResult:
        if (busy := _busy(state)) is not None:
            return busy
        rid = state.resolve_receptacle(receptacle)
        if rid is None:
            return ToolResult.fail(f"unknown receptacle '{str(receptacle)[:60]}'; use one of: {', '.join(state.scene.receptacles)}")
        state.location = rid
        return state.view(rid)


class PickTool:
    name = "pick"
    description = "Pick up an object (its id, e.g. 'obj_3') from the receptacle you are at. Your hand must be empty."
    parameters = {"type": "object", "properties": {"object_id": {"type": ["string", "integer"]}}, "required": ["object_id"], "additionalProperties": False}

    def __call__(self, state: AskState, object_id: str | int) -> ToolResult:
        if (busy := _busy(state)) is not None:
            return busy
        if state.holding is not None:
            return ToolResult.fail(f"you are already holding {state.holding}; place(receptacle) it first")
        if state.location is None:
            return ToolResult.fail("you are not at a receptacle; navigate(receptacle) to where the object is first")
        oid = state.resolve_object(object_id)
        here = state.here()
        if oid is None or oid not in here:
            what = f"no object '{str(object_id)[:40]}'" if oid is None else f"{oid} is not here"
            return ToolResult.fail(f"{what} on the {state.scene.receptacles[state.location].name}; objects here: {', '.join(here) or 'none'}")
        state.objects[oid].receptacle = None
        state.holding = oid
        if oid != state.scene.target:
            state.wrong_picks += 1
            state.events.append(("wrong_pick", oid))
        return ToolResult(text=f"You picked up {oid}.")


class PlaceTool:
    name = "place"
    description = "Put the object you hold on the receptacle you are at (navigate there first)."
    parameters = {"type": "object", "properties": {"receptacle": {"type": ["string", "integer"]}}, "required": ["receptacle"], "additionalProperties": False}

    def __call__(self, state: AskState, receptacle: str | int) -> ToolResult:
        if (busy := _busy(state)) is not None:
            return busy
        if state.holding is None:
            return ToolResult.fail("you are not holding anything; pick(object_id) first")
        rid = state.resolve_receptacle(receptacle)
        if rid is None:
            return ToolResult.fail(f"unknown receptacle '{str(receptacle)[:60]}'; use one of: {', '.join(state.scene.receptacles)}")
        if rid != state.location:
            return ToolResult.fail(f"you are at {state.location or 'the entrance'}, not {rid}; navigate(receptacle='{rid}') first")
        taken = {state.objects[o].slot for o in state.here()}
        free = [s for s in range(SLOTS) if s not in taken]
        if not free:
            return ToolResult.fail(f"the {state.scene.receptacles[rid].name} is full; place it somewhere else")
        obj = state.objects[state.holding]
        obj.receptacle, obj.slot = rid, free[0]
        state.holding = None
        res = state.view(rid)
        res.text = f"You placed {obj.oid}. " + res.text
        return res


class AskTool:
    name = "ask"
    description = "Ask the user one clarifying question about the object they want (its colour, size or location). Questions beyond those needed cost reward."
    parameters = {"type": "object", "properties": {"question": {"type": "string"}}, "required": ["question"], "additionalProperties": False}

    def __call__(self, state: AskState, question: str) -> ToolResult:
        if (busy := _busy(state)) is not None:
            return busy
        state.questions += 1
        state.events.append(("question", state.questions))
        q = question.strip()
        if not q or len(q) > MAX_QUESTION_CHARS:
            answer = DONT_UNDERSTAND  # empty or huge: not passed to the user at all
        else:
            answer = state.user(q, target_description(state.scene))
            if not isinstance(answer, str):
                logger.warning("the user returned %s, not str; treating it as no answer", type(answer).__name__)
                answer = DONT_UNDERSTAND
            kind = classify_question(q, state.scene.category)
            if kind in KINDS:
                state.revealed.add(kind)
        shown = q if len(q) <= 200 else q[:200] + "..."
        return ToolResult(text=f'You asked: "{shown}"\nUser: {answer[:MAX_ANSWER_CHARS]}')


class DoneTool:
    name = "done"
    description = "Declare the task finished; ends the episode."
    parameters = {"type": "object", "properties": {}, "additionalProperties": False}

    def __call__(self, state: AskState) -> ToolResult:
        if (busy := _busy(state)) is not None:
            return busy
        state.finished = True
        return ToolResult(text="You declared the task done.")


class AskToActEnv(MMEnv):
    """Ask-to-Act: see the module docstring.

    Args:
        ambiguity_types: which of ``unambiguous, attribute, spatial, size, combination`` to draw (uniformly).
        max_candidates: most instances of the target category (2-4; ``combination`` needs >= 3).
        question_cost: paid (as a negative ``question`` term) per question beyond the minimum.
        wrong_pick_penalty: paid (as a negative ``wrong_pick`` term) per pick of a non-target.
        user: any ``(question, target_description) -> str``; default ``RuleBasedUser()``.
        describe_objects: also list each object's size, colour and category in text: every
            object by receptacle under the map, and the objects of a close-up view.
        map_size / view_size: sides of the top-down map and the egocentric close-up (px).
    """

    description = "Ask-to-Act: fetch the right object under an ambiguous instruction, asking as few questions as needed."

    def __init__(
        self,
        *,
        ambiguity_types: tuple[str, ...] | list[str] = AMBIGUITY_TYPES,
        max_candidates: int = 4,
        question_cost: float = 0.1,
        wrong_pick_penalty: float = 0.1,
        user: UserFn | None = None,
        describe_objects: bool = False,
        map_size: int = 224,
        view_size: int = 128,
        max_turns: int = 12,
        rubric: str | Rubric = "ask_to_act",
        **kwargs: Any,
    ):
        types = tuple(ambiguity_types)
        bad = [t for t in types if t not in AMBIGUITY_TYPES]
        if bad or not types:
            raise ValueError(f"ambiguity_types must be a non-empty subset of {AMBIGUITY_TYPES}, got {types}")
        if not 2 <= int(max_candidates) <= SLOTS or ("combination" in types and max_candidates < 3):
            raise ValueError(f"max_candidates must be in 2..{SLOTS} (>= 3 with 'combination'), got {max_candidates}")
        for name, v in (("question_cost", question_cost), ("wrong_pick_penalty", wrong_pick_penalty)):
            if not (math.isfinite(float(v)) and float(v) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        for name, v in (("map_size", map_size), ("view_size", view_size)):
            if not 64 <= int(v) <= 1024:
                raise ValueError(f"{name} must be in 64..1024 px, got {v}")
        if user is not None and not callable(user):
            raise TypeError(f"user must be a callable (question, target_description) -> str, got {type(user).__name__}")
        self.ambiguity_types = types
        self.max_candidates = int(max_candidates)
        self.question_cost = float(question_cost)
        self.wrong_pick_penalty = float(wrong_pick_penalty)
        self.user: UserFn = user if user is not None else RuleBasedUser()
        self.describe_objects = bool(describe_objects)
        self.map_size, self.view_size = int(map_size), int(view_size)
        super().__init__(max_turns=max_turns, rubric=rubric, **kwargs)

    # ---------------------------------------------------------------- tasks
    def sample_task(self, rng: np.random.Generator, index: int | None) -> AskTask:
        if index is not None:  # evaluation task i: its own stream, independent of the env seed
            rng, task_id = np.random.default_rng([index, _SALT]), f"ask2act-{index}"
        else:
            task_id = f"ask2act-r{int(rng.integers(2**31))}"
        ambiguity = self.ambiguity_types[int(rng.integers(len(self.ambiguity_types)))]
        scene = generate_scene(rng, ambiguity, max_candidates=self.max_candidates)
        return AskTask(task_id=task_id, prompt=self._prompt(scene), images=(render_map(scene, scene.objects, self.map_size),), scene=scene)

    def _prompt(self, scene: Scene) -> str:
        goal = scene.receptacles[scene.goal].name
        recs = ", ".join(f"{r.index}: {r.rid}" for r in scene.receptacles.values())
        legend = ", ".join(f"{c} = {s}" for c, s in CATEGORIES.items())
        return (
            f"<image>\nA top-down map of the house. The user says: \"Bring me the {scene.category} and put it on the {goal}.\"\n"
            f"Receptacles (number on the map: name): {recs}.\n"
            f"Objects are drawn as shapes ({legend}) in colours and in three sizes (small, medium, large); "
            "close-up views show each object's id number.\n"
            f"{self._map_listing(scene)}"
            "Tools: navigate(receptacle) to go to a receptacle and see it close up; pick(object_id) there; "
            "place(receptacle) where you are; ask(question) to ask the user about the object they mean "
            f"(each question beyond those needed costs {self.question_cost:g}; picking a wrong object costs "
            f"{self.wrong_pick_penalty:g}); done() when the object is in place. At most {self.max_calls_per_turn} tool call(s) per turn."
        )

    def _map_listing(self, scene: Scene) -> str:
        """With ``describe_objects``: what the map shows, in text (receptacle: id (size colour
        category), ...), so a model that cannot read the drawing still sees every object."""
        if not self.describe_objects:
            return ""
        per_rec = []
        for rid in scene.receptacles:
            objs = [o for o in scene.objects.values() if o.receptacle == rid]
            if objs:
                per_rec.append(f"{rid}: " + ", ".join(f"{o.oid} ({o.describe()})" for o in objs))
        return "On the map: " + "; ".join(per_rec) + ".\n"

    def tool_state(self, task: AskTask) -> AskState:
        return AskState(task.scene, task.scene.copy_objects(), self.user, self.view_size, self.describe_objects)

    def make_tools(self) -> list:
        return [NavigateTool(), PickTool(), PlaceTool(), AskTool(), DoneTool()]

    # ---------------------------------------------------------------- rewards
    def _static_metrics(self) -> dict[str, float]:
        scene = self.task.scene
        return {
            "min_questions": float(len(scene.min_kinds)),
            "num_candidates": float(len(scene.candidates)),
            "ambiguity_type": float(AMBIGUITY_TYPES.index(scene.ambiguity)),
        }

    def turn_terms(self, calls: list[ToolCall], results: list[ToolResult]) -> dict[str, float]:
        st: AskState = self._state
        need = len(st.scene.min_kinds)
        extra = sum(1 for kind, n in st.events if kind == "question" and n > need)
        wrong = sum(1 for kind, _ in st.events if kind == "wrong_pick")
        st.events.clear()
        self._metrics.update(questions=float(st.questions), extra_questions=float(max(0, st.questions - need)), wrong_picks=float(st.wrong_picks))
        terms: dict[str, float] = {}
        if extra:
            terms["question"] = -self.question_cost * extra
        if wrong:
            terms["wrong_pick"] = -self.wrong_pick_penalty * wrong
        return terms

    def _judge(self) -> Verdict:
        st: AskState = self._state
        ok = st.objects[st.scene.target].receptacle == st.scene.goal
        return Verdict(float(ok), {"success": float(ok)})

    def goal_verdict(self) -> Verdict | None:
        return self._judge() if self._state.finished else None

    def goal_reason(self, verdict: Verdict) -> str:
        return "goal" if verdict.accuracy >= 1.0 else "failure"

    def verify(self, task: AskTask, answer: str) -> Verdict:
        """An ``<answer>`` ends the episode like ``done()``: the world state is judged."""
        return self._judge()

    # ---------------------------------------------------------------- gym API additions
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        obs, info = super().reset(seed=seed, options=options)
        self._metrics.update(self._static_metrics(), questions=0.0, extra_questions=0.0, wrong_picks=0.0, success=0.0)
        return obs, info

    def step(self, action: str) -> tuple[dict, float, bool, bool, dict]:
        """``MMEnv.step`` plus ``questions_asked`` every turn and, at the end, ``min_questions``,
        ``ambiguity``, ``num_candidates`` and ``wrong_picks`` (the paper's episode metrics)."""
        obs, reward, terminated, truncated, info = super().step(action)
        st: AskState = self._state
        info["questions_asked"] = st.questions
        if terminated or truncated:
            info.update(min_questions=len(st.scene.min_kinds), ambiguity=st.scene.ambiguity,
                        num_candidates=len(st.scene.candidates), wrong_picks=st.wrong_picks)
        return obs, reward, terminated, truncated, info

    def state_key(self) -> str:
        """GiGPO anchor: task, agent location, held object, facts asked, objects moved."""
        st: AskState | None = self._state
        if st is None or self.task is None:
            return super().state_key()
        moved = sorted(f"{o.oid}@{o.receptacle}" for o in st.objects.values() if o.receptacle != st.scene.objects[o.oid].receptacle)
        key = f"{self.task.task_id}|at={st.location}|hold={st.holding}|asked={','.join(sorted(st.revealed))}|moved={','.join(moved)}"
        return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()

    # ---------------------------------------------------------------- scripted
    def oracle_action(self) -> str:
        """Ask exactly the minimum (one question per kind in ``min_kinds``), then fetch the target."""
        st: AskState = self._state
        need = [k for k in st.scene.min_kinds if k not in st.revealed]
        if need and st.holding is None and not st.finished:
            return self.parser.format_call(ToolCall("ask", {"question": QUESTIONS[need[0]].format(st.scene.category)}))
        return self.parser.format_call(_act_on(st, st.scene.target))


# -------------------------------------------------------------------- baselines
def _act_on(st: AskState, oid: str) -> ToolCall:
    """The next call that moves ``oid`` onto the goal receptacle and finishes."""
    goal = st.scene.goal
    if st.holding == oid:
        return ToolCall("navigate", {"receptacle": goal}) if st.location != goal else ToolCall("place", {"receptacle": goal})
    if st.holding is not None:  # holding something else: put it back where we stand
        return ToolCall("place", {"receptacle": st.location})
    where = st.objects[oid].receptacle
    if where == goal or st.finished:
        return ToolCall("done", {})
    return ToolCall("navigate", {"receptacle": where}) if st.location != where else ToolCall("pick", {"object_id": oid})


def _consistent(st: AskState) -> list[str]:
    """Candidates that agree with the user's answers so far (initial colour, size, location)."""
    t = st.scene.objects[st.scene.target]
    return [c for c in st.scene.candidates if all(st.scene.objects[c].value(k) == t.value(k) for k in st.revealed)]


def _guess(env: Any, rng: np.random.Generator, pool: list[str]) -> str:
    """Act on a candidate drawn uniformly from ``pool``: go to a random candidate's
    receptacle, then pick uniformly among the pool's objects there (so each is 1/len(pool))."""
    base: AskToActEnv = env.unwrapped
    st: AskState = base._state
    chosen = [c for c in pool if st.holding == c or st.objects[c].receptacle == st.scene.goal]
    if chosen:
        return base.parser.format_call(_act_on(st, chosen[0]))
    here = [c for c in pool if st.location is not None and st.objects[c].receptacle == st.location]
    pick_from = here if here else pool
    return base.parser.format_call(_act_on(st, pick_from[int(rng.integers(len(pick_from)))]))


def never_ask(env: Any, rng: np.random.Generator) -> str:
    """Never ask: guess uniformly among the candidates (succeeds about 1/k when ambiguous)."""
    return _guess(env, rng, list(env.unwrapped._state.scene.candidates))


def always_ask(env: Any, rng: np.random.Generator) -> str:
    """Ask about colour, size and location (whether needed or not), then fetch."""
    base: AskToActEnv = env.unwrapped
    st: AskState = base._state
    todo = [k for k in KINDS if k not in st.revealed]
    if todo and st.holding is None and not st.finished:
        return base.parser.format_call(ToolCall("ask", {"question": QUESTIONS[todo[0]].format(st.scene.category)}))
    return _guess(env, rng, _consistent(st))


def minimal_ask(env: Any, rng: np.random.Generator) -> str:
    """The oracle: ask exactly the minimum number of questions (``env.oracle_action()``)."""
    return env.unwrapped.oracle_action()


BASELINES: dict[str, Callable[[Any, np.random.Generator], str]] = {"oracle": minimal_ask, "never_ask": never_ask, "always_ask": always_ask}


def play_episode(env: Any, policy: Callable[[Any, np.random.Generator], str], rng: np.random.Generator, **reset_kwargs: Any) -> dict[str, Any]:
    """Run one episode of a scripted ``policy``; returns the final info plus ``return``."""
    env.reset(**reset_kwargs)
    total = 0.0
    while True:
        _, reward, terminated, truncated, info = env.step(policy(env, rng))
        total += reward
        if terminated or truncated:
            return dict(info, **{"return": total})
