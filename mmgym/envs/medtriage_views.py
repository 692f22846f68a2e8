"""Single-agent Gymnasium views of ``MedTriage`` (MMedAgent-RL): one role is the agent and
the other roles are scripted, so the single-agent trainer can train that role.

* ``mmgym/MedTriage-Attending-v0`` — the attending physician: the case plus the opinions of
  scripted specialists (the C-MARL curriculum picks all-correct / conflicting / all-wrong);
  reply ``<answer>...</answer>``. Reward: rubric ``accuracy`` + ``format``.
* ``mmgym/MedTriage-Triage-v0`` — the triage doctor: the case; reply
  ``refer(specialties=[...])``. Reward: ``accuracy`` = routing score + ``format``; the
  metric ``team_accuracy`` says whether a majority-following attending then got it right.
* ``mmgym/MedTriage-TwoRole-v0`` — one shared policy trains both roles: episodes alternate
  triage / attending, the role is named in ``info["system_prompt"]`` (``role_system_prompt``)
  and in the first line of the observation.

Wrong-phase actions (the triage doctor answering, the attending calling a tool) are
malformed replies: feedback, a ``format`` penalty, and the episode goes on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from mmgym.core import ToolCall, UnicodeText
from mmgym.envs.base import MAX_ACTION, MMEnv, Task, Verdict
from mmgym.envs.medtriage_cases import QUESTION_TYPES, SPECIALTIES, MedCase, verify_case
from mmgym.envs.medtriage_common import CaseSource, ReferState, ReferTool, Team, attending_prompt, role_system_prompt, routing_score, specialist_prompt, triage_prompt
from mmgym.envs.medtriage_specialists import Opinion, bucket_of, majority_attending, oracle_attending
from mmgym.tools import ParseResult, ToolParser

__all__ = ["MedTriageAttendingEnv", "MedTriageTriageEnv", "MedTriageTwoRoleEnv", "MedTriageTask", "role_system_prompt"]


@dataclass(slots=True)
class MedTriageTask(Task):
    case: MedCase | None = None
    referred: tuple[str, ...] = ()
    opinions: tuple[Opinion, ...] = ()
    bucket_target: str = "natural"
    seed: int = 0  # for draws after the agent acted (triage view: the specialists' opinions)


class _RoleParser:
    """Wraps a parser so the wrong kind of action for a role is a malformed reply."""

    def __init__(self, inner: ToolParser, *, answers: bool, message: str):
        self.inner, self.answers, self.message = inner, answers, message
        self.name = inner.name

    def parse(self, text: str) -> ParseResult:
        res = self.inner.parse(text)
        if res.error is None and ((res.answer is not None) != self.answers):
            return ParseResult(error=self.message, format_ok=False)
        return res

    def format_call(self, call: ToolCall) -> str:
        return self.inner.format_call(call)

    def format_answer(self, answer: str) -> str:
        return self.inner.format_answer(answer)

    def instructions(self) -> str:
        return self.inner.instructions()


class _MedTriageView(MMEnv):
    """Shared construction: cases, scripted team, curriculum options, role info."""

    role: ClassVar[str] = ""

    def __init__(
        self,
        *,
        dataset: str | None = None,
        image_root: str | None = None,
        lang: str = "en",
        default_specialty: str = "pathology",
        scan_size: int = 160,
        p_normal: float = 0.15,
        question_types: Sequence[str] = QUESTION_TYPES,
        specialists: Mapping[str, Any] | None = None,
        specialist_accuracy: float | Mapping[str, float] = 0.85,
        outside_accuracy: float | None = None,
        wrong_agreement: float = 0.5,
        curriculum: Any = "uniform",
        curriculum_episodes: int | None = None,
        max_turns: int = 2,
        rubric: Any = "accuracy",
        **kwargs: Any,
    ):
        self.cases = CaseSource(dataset, image_root=image_root, lang=lang, default_specialty=default_specialty, scan_size=scan_size, p_normal=p_normal, question_types=question_types)
        self.team = Team.build(
            specialists, specialist_accuracy=specialist_accuracy, outside_accuracy=outside_accuracy, wrong_agreement=wrong_agreement,
            curriculum=curriculum, curriculum_episodes=curriculum_episodes,
        )
        self._options: dict[str, Any] = {}
        super().__init__(max_turns=max_turns, rubric=rubric, **kwargs)

    def num_tasks(self) -> int | None:
        return self.cases.num_cases()

    def set_curriculum_progress(self, progress: float) -> None:
        """C-MARL schedule position in [0, 1] (easy buckets first, hard ones later)."""
        self.team.set_progress(progress)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        """Extra options: ``bucket`` (force a curriculum bucket), ``progress`` (curriculum position)."""
        self._options = dict(options or {})
        obs, info = super().reset(seed=seed, options=options)
        info.update(role=self.role, system_prompt=role_system_prompt(self.role), bucket_target=self.task.bucket_target)
        if self.task.opinions or self.role == "attending":
            info["bucket"] = bucket_of(self.task.opinions)
        return obs, info

    def _specialist_obs(self, case: MedCase) -> Any:
        def make(s: str) -> dict[str, Any]:
            return {"text": specialist_prompt(case, s), "images": (case.image,), "frames": (), "frame_times": (), "source": 0, "turn": 0}

        return make

    def _opinions(self, case: MedCase, referred: Sequence[str], rng: np.random.Generator, bucket: str | None) -> tuple[Opinion, ...]:
        ops, _errors = self.team.internal_opinions(case, referred, rng, bucket, self._specialist_obs(case))
        return tuple(ops[s] for s in referred if s in ops)


class MedTriageAttendingEnv(_MedTriageView):
    """The attending physician with scripted triage and specialists (MMedAgent-RL).

    Args (besides the case / team ones of ``MedTriageEnv``):
        num_consulted: specialists whose opinions the attending sees: the matching one plus
            ``num_consulted - 1`` others, in random order (>= 2 makes conflict possible).
    """

    description = "MMedAgent-RL attending physician: weigh scripted specialists' opinions (right, conflicting or wrong) and answer."
    role = "attending"

    def __init__(self, *, num_consulted: int = 3, **kwargs: Any):
        if not 1 <= num_consulted <= len(SPECIALTIES):
            raise ValueError(f"num_consulted must lie in [1, {len(SPECIALTIES)}], got {num_consulted}")
        self.num_consulted = int(num_consulted)
        super().__init__(**kwargs)
        self.parser = _RoleParser(self.parser, answers=True, message="the attending physician has no tools; reply with <answer>...</answer>")

    def sample_task(self, rng: np.random.Generator, index: int | None) -> MedTriageTask:
        case, r = self.cases.sample(rng, index)
        bucket = self.team.next_bucket(r, self._options)
        others = [s for s in SPECIALTIES if s != case.specialty]
        chosen = [case.specialty] + [others[int(i)] for i in r.permutation(len(others))[: self.num_consulted - 1]]
        referred = tuple(chosen[int(i)] for i in r.permutation(len(chosen)))
        ops = self._opinions(case, referred, r, bucket)
        return MedTriageTask(
            task_id=case.case_id, prompt=attending_prompt(case, ops, f"[from triage] Referred to: {', '.join(referred)}."), images=(case.image,), case=case,
            referred=referred, opinions=ops, bucket_target=bucket or "natural",
        )

    def verify(self, task: MedTriageTask, answer: str) -> Verdict:
        follows = float(majority_attending(task.prompt) == f"<answer>{answer}</answer>")
        return Verdict(verify_case(task.case, answer), {"follows_majority": follows})

    def oracle_action(self) -> str:
        return oracle_attending(self.task.case)


class MedTriageTriageEnv(_MedTriageView):
    """The triage doctor with scripted specialists and a majority-following attending."""

    description = "MMedAgent-RL triage doctor: refer the case to the specialty matching its modality/organ."
    role = "triage"

    def __init__(self, *, max_referrals: int = 2, max_turns: int = 3, **kwargs: Any):
        self.max_referrals = int(max_referrals)
        super().__init__(max_turns=max_turns, **kwargs)
        self.parser = _RoleParser(self.parser, answers=False, message="the triage doctor does not answer; refer the case with refer(specialties=[...])")

    def make_tools(self) -> list:
        return [ReferTool(self.max_referrals)]

    def tool_state(self, task: MedTriageTask) -> ReferState:
        return ReferState()

    def sample_task(self, rng: np.random.Generator, index: int | None) -> MedTriageTask:
        case, r = self.cases.sample(rng, index)
        bucket = self.team.next_bucket(r, self._options)
        return MedTriageTask(
            task_id=case.case_id, prompt=triage_prompt(case), images=(case.image,), case=case,
            bucket_target=bucket or "natural", seed=int(r.integers(2**62)),
        )

    def goal_verdict(self) -> Verdict | None:
        referred = self._state.referred
        if referred is None:
            return None
        task: MedTriageTask = self.task
        rng = np.random.default_rng(task.seed)
        ops = self._opinions(task.case, referred, rng, None if task.bucket_target == "natural" else task.bucket_target)
        reply = majority_attending(attending_prompt(task.case, ops))
        team = verify_case(task.case, reply[len("<answer>"):-len("</answer>")])
        score = routing_score(referred, task.case.specialty)
        return Verdict(score, {"routing": score, "team_accuracy": team, "num_referred": float(len(referred))})

    def verify(self, task: MedTriageTask, answer: str) -> Verdict:
        return Verdict(0.0)  # unreachable: the role parser rejects answers

    def oracle_action(self) -> str:
        return self.parser.format_call(ToolCall("refer", {"specialties": [self.task.case.specialty]}))


class MedTriageTwoRoleEnv(gym.Env[dict, str]):
    """One shared policy, two roles (MMedAgent-RL trains both generalists): episodes
    alternate ``roles`` (restarting at the first role whenever ``reset`` gets a seed),
    or ``options={"role": r}`` picks one. ``info["role"]`` and ``info["system_prompt"]``
    name the role and the first observation starts with ``Role: <role>.``.

    Args:
        roles: the roles to cycle through (``triage`` and/or ``attending``).
        triage_kwargs / attending_kwargs: extra arguments of each view; other kwargs go to both.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 1}
    description = "MMedAgent-RL with one shared policy: episodes alternate the triage doctor and the attending physician."

    def __init__(self, *, roles: Sequence[str] = ("triage", "attending"), triage_kwargs: Mapping[str, Any] | None = None, attending_kwargs: Mapping[str, Any] | None = None, max_turns: int = 3, **kwargs: Any):
        bad = [r for r in roles if r not in ("triage", "attending")]
        if bad or not roles:
            raise ValueError(f"roles must be a non-empty sequence of 'triage' / 'attending', got {tuple(roles)}")
        self.roles = tuple(roles)
        self.views: dict[str, MMEnv] = {
            "triage": MedTriageTriageEnv(max_turns=max_turns, **kwargs, **dict(triage_kwargs or {})),
            "attending": MedTriageAttendingEnv(max_turns=max_turns, **kwargs, **dict(attending_kwargs or {})),
        }
        self.observation_space = self.views["triage"].observation_space
        self.action_space = UnicodeText(MAX_ACTION)
        self.render_mode = kwargs.get("render_mode")
        self.role = self.roles[0]
        self._count = 0

    @property
    def current(self) -> MMEnv:
        return self.views[self.role]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        options = dict(options or {})
        if seed is not None:
            self._count = 0
        role = options.pop("role", None)
        if role is not None and role not in self.roles:
            raise ValueError(f"options['role'] must be one of {self.roles}, got {role!r}")
        self.role = role or self.roles[self._count % len(self.roles)]
        self._count += 1
        obs, info = self.current.reset(seed=int(self.np_random.integers(2**62)), options=options)
        obs = dict(obs, text=f"Role: {self.role}.\n" + obs["text"])
        return obs, info

    def step(self, action: str) -> tuple[dict, float, bool, bool, dict]:
        return self.current.step(action)

    def oracle_action(self) -> str:
        return self.current.oracle_action()

    def set_curriculum_progress(self, progress: float) -> None:
        for v in self.views.values():
            v.set_curriculum_progress(progress)

    def render(self) -> np.ndarray | None:
        return self.current.render()

    @property
    def tool_schemas(self) -> list[dict[str, Any]]:
        return self.current.tool_schemas
