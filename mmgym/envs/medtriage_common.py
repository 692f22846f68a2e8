"""Pieces shared by the multi-agent ``MedTriage`` env and its single-agent views
(MMedAgent-RL): the ``refer`` tool, role prompts, the case source and the specialist team.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mmgym.core import ToolResult
from mmgym.envs.datasets import DEFAULT_MAX_PIXELS
from mmgym.envs.medtriage_cases import (
    QUESTION_TYPES,
    SPECIALTIES,
    SPECIALTY_ORGANS,
    MedCase,
    dataset_case,
    medvqa_rows,
    normalize_specialty,
    procedural_case,
)
from mmgym.envs.medtriage_specialists import (
    BUCKETS,
    Opinion,
    ScriptedSpecialist,
    TextPolicy,
    get_curriculum,
    opinion_from_reply,
    policy_reply,
    scripted_opinions,
)

__all__ = [
    "Role",
    "ROLES",
    "ReferState",
    "ReferTool",
    "CaseSource",
    "Team",
    "role_system_prompt",
    "triage_prompt",
    "specialist_prompt",
    "attending_prompt",
    "routing_score",
]

log = logging.getLogger(__name__)
Role = Literal["triage", "specialist", "attending"]
ROLES: tuple[str, ...] = ("triage", "specialist", "attending")
_SALT = 0x4D3D


# ---------------------------------------------------------------------- prompts
def _specialty_list() -> str:
    return ", ".join(f"{s} ({SPECIALTY_ORGANS[s]})" for s in SPECIALTIES)


def role_system_prompt(role: str, specialty: str | None = None) -> str:
    """The system prompt of ``role`` — the way one shared policy is told which role it plays
    (MMedAgent-RL trains the triage doctor and the attending physician; a shared policy
    sees the role here and nowhere else)."""
    if role == "triage":
        return (
            "You are the triage doctor of a multidisciplinary medical team. Look at the image and the "
            f"question and refer the case to the specialties that should read it. Specialties: {_specialty_list()}. "
            'Reply with <tool_call>{"name": "refer", "arguments": {"specialties": ["..."]}}</tool_call>.'
        )
    if role == "attending":
        return (
            "You are the attending physician of a multidisciplinary medical team. You see the case and the "
            "specialists' opinions, each as [from specialist_<name>] ...; they may be right, conflicting or "
            "wrong. Weigh them against your own reading of the image and decide. Reply with <answer>...</answer> "
            "(the option letter for multiple-choice questions)."
        )
    if role == "specialist":
        who = f"the {specialty} specialist" if specialty else "a specialist"
        return (
            f"You are {who} of a multidisciplinary medical team. Read the image and answer the question: "
            "<answer>...</answer> (the option letter for multiple-choice questions) followed by a one-sentence rationale."
        )
    raise ValueError(f"unknown role {role!r}; known: {', '.join(ROLES)}")


def triage_prompt(case: MedCase) -> str:
    return case.prompt() + (
        f"\nRefer the case to the matching specialties ({_specialty_list()}) with "
        '<tool_call>{"name": "refer", "arguments": {"specialties": ["..."]}}</tool_call>.'
    )


def specialist_prompt(case: MedCase, specialty: str) -> str:
    return case.prompt() + f"\nAs the {specialty} specialist, reply with <answer>...</answer> and a one-sentence rationale."


def attending_prompt(case: MedCase, opinions: Sequence[Opinion], note: str = "") -> str:
    lines = "\n".join(o.render() for o in opinions) if opinions else "No specialist opinion is available."
    how = "<answer>letter</answer>" if case.options else "<answer>your answer</answer>"
    note = f"{note}\n" if note else ""
    return (
        f"{case.prompt()}\n{note}Specialist opinions (they may be right, conflicting or wrong):\n{lines}\n"
        f"Weigh them against your own reading of the image and reply with {how}."
    )


def routing_score(referred: Sequence[str], specialty: str) -> float:
    """Triage reward: 1 for exactly the matching specialty, 1/n when it is among n referrals, else 0.

    >>> routing_score(["neuro"], "neuro"), routing_score(["neuro", "chest"], "neuro"), routing_score(["chest"], "neuro")
    (1.0, 0.5, 0.0)
    """
    return 1.0 / len(referred) if referred and specialty in referred else 0.0


# ---------------------------------------------------------------------- refer tool
@dataclass(slots=True)
class ReferState:
    """Per-episode state of the ``refer`` tool: the referral once made."""

    referred: list[str] | None = None


class ReferTool:
    """``refer(specialties=[...])``: the triage doctor's one action (MMedAgent-RL)."""

    name = "refer"

    def __init__(self, max_referrals: int = 2):
        if max_referrals < 1:
            raise ValueError(f"max_referrals must be >= 1, got {max_referrals}")
        self.max_referrals = int(max_referrals)
        self.description = f"Refer the case to 1-{self.max_referrals} specialties: {_specialty_list()}."
        self.parameters: dict[str, Any] = {
            "type": "object",
            "properties": {
                "specialties": {"type": "array", "items": {"type": "string", "maxLength": 64}, "maxItems": self.max_referrals, "description": f"names from: {', '.join(SPECIALTIES)}"},
            },
            "required": ["specialties"],
            "additionalProperties": False,
        }

    def __call__(self, state: ReferState, *, specialties: list[str]) -> ToolResult:
        if state.referred is not None:
            return ToolResult.fail(f"the case was already referred to {', '.join(state.referred)}; refer only once")
        if not specialties:
            return ToolResult.fail(f"refer(specialties=[...]) referred nobody; name at least one of: {', '.join(SPECIALTIES)}")
        names: list[str] = []
        for raw in specialties:
            spec = normalize_specialty(raw)
            if spec is None:
                return ToolResult.fail(f"unknown specialty {raw[:64]!r}; known: {', '.join(SPECIALTIES)}")
            if spec not in names:
                names.append(spec)
        state.referred = names
        return ToolResult(text=f"Referred to: {', '.join(names)}.")


# ---------------------------------------------------------------------- cases
class CaseSource:
    """Procedural cases (default) or rows of a medical VQA file (``medvqa_rows``)."""

    def __init__(
        self,
        dataset: str | Path | None = None,
        *,
        image_root: str | Path | None = None,
        lang: str = "en",
        default_specialty: str = "pathology",
        scan_size: int = 160,
        max_side: int = 448,
        p_normal: float = 0.15,
        question_types: Sequence[str] = QUESTION_TYPES,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        bad = set(question_types) - set(QUESTION_TYPES)
        if bad or not question_types:
            raise ValueError(f"question_types must be a non-empty subset of {QUESTION_TYPES}, got {tuple(question_types)}")
        if not 32 <= scan_size <= 2048:
            raise ValueError(f"scan_size must lie in [32, 2048], got {scan_size}")
        if not 0.0 <= p_normal <= 1.0:
            raise ValueError(f"p_normal must lie in [0, 1], got {p_normal}")
        self.scan_size, self.max_side, self.p_normal = int(scan_size), int(max_side), float(p_normal)
        self.question_types = tuple(question_types)
        self.max_pixels = int(max_pixels)
        self.rows = medvqa_rows(dataset, image_root=image_root, lang=lang, default_specialty=default_specialty, max_pixels=max_pixels) if dataset else None
        self._pool = sorted({r.answer for r in self.rows}) if self.rows else []

    def num_cases(self) -> int | None:
        return len(self.rows) if self.rows is not None else None

    def sample(self, rng: np.random.Generator, index: int | None) -> tuple[MedCase, np.random.Generator]:
        """A case and the stream to draw the rest of the episode from (fixed for a given ``index``)."""
        if index is not None:
            rng = np.random.default_rng([index, _SALT])
        if self.rows is not None:
            i = int(rng.integers(len(self.rows))) if index is None else index
            return dataset_case(self.rows[i], rng, self._pool, self.max_side, self.max_pixels), rng
        cid = f"med-{index}" if index is not None else f"med-r{int(rng.integers(2**31))}"
        return procedural_case(rng, cid, size=self.scan_size, p_normal=self.p_normal, question_types=self.question_types), rng


# ---------------------------------------------------------------------- team
@dataclass(slots=True)
class Team:
    """The specialists and the C-MARL curriculum.

    ``backends`` maps each specialty to a ``ScriptedSpecialist``, a ``TextPolicy``, a
    callable ``(obs) -> str`` or ``"agent"`` (acts through the multi-agent API).
    ``progress`` in [0, 1] picks the curriculum stage; set it with ``set_progress`` or let
    ``curriculum_episodes`` advance it by one ``1/curriculum_episodes`` per episode.
    """

    backends: dict[str, Any]
    curriculum: Any
    wrong_agreement: float = 0.5
    curriculum_episodes: int | None = None
    progress: float = 0.0
    episodes: int = 0
    errors: list[str] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        specialists: Mapping[str, Any] | str | None = None,
        *,
        specialist_accuracy: float | Mapping[str, float] = 0.85,
        outside_accuracy: float | None = None,
        wrong_agreement: float = 0.5,
        curriculum: Any = "uniform",
        curriculum_episodes: int | None = None,
        allow_agents: bool = False,
    ) -> Team:
        if not 0.0 <= wrong_agreement <= 1.0:
            raise ValueError(f"wrong_agreement must lie in [0, 1], got {wrong_agreement}")
        if curriculum_episodes is not None and curriculum_episodes < 1:
            raise ValueError(f"curriculum_episodes must be >= 1 or None, got {curriculum_episodes}")
        spec_map: Mapping[str, Any] = {s: specialists for s in SPECIALTIES} if isinstance(specialists, str) else (specialists or {})
        unknown = [k for k in spec_map if k not in SPECIALTY_ORGANS]
        if unknown:
            raise ValueError(f"unknown specialties {unknown} in specialists; known: {', '.join(SPECIALTIES)}")
        acc = specialist_accuracy if isinstance(specialist_accuracy, Mapping) else {s: specialist_accuracy for s in SPECIALTIES}
        backends: dict[str, Any] = {}
        for s in SPECIALTIES:
            b = spec_map.get(s, "scripted")
            if b == "scripted":
                b = ScriptedSpecialist(s, float(acc.get(s, 0.85)), outside_accuracy)
            elif b == "agent" and not allow_agents:
                raise ValueError(f"specialist {s!r} = 'agent' needs the multi-agent env (mmgym.envs.medtriage.parallel_env); single-agent views take 'scripted', a policy or a callable")
            elif not (b == "agent" or isinstance(b, (ScriptedSpecialist, TextPolicy)) or callable(b)):
                raise TypeError(f"specialist {s!r}: expected 'scripted', 'agent', a ScriptedSpecialist, an object with generate(conversations, sampling) or a callable (obs) -> str; got {type(b).__name__}")
            backends[s] = b
        return cls(backends, get_curriculum(curriculum), float(wrong_agreement), curriculum_episodes)

    def set_progress(self, progress: float) -> None:
        """Curriculum progress in [0, 1] (e.g. the trainer's fraction of updates done)."""
        if not 0.0 <= float(progress) <= 1.0:
            raise ValueError(f"curriculum progress must lie in [0, 1], got {progress}")
        self.progress = float(progress)

    def next_bucket(self, rng: np.random.Generator, options: Mapping[str, Any]) -> str | None:
        """The target bucket of a new episode: ``options['bucket']`` if given, else the schedule's draw."""
        if "progress" in options:
            self.set_progress(options["progress"])
        elif self.curriculum_episodes is not None:
            self.progress = min(1.0, self.episodes / self.curriculum_episodes)
        self.episodes += 1
        forced = options.get("bucket")
        if forced is not None:
            if forced not in (*BUCKETS, "natural"):
                raise ValueError(f"options['bucket'] must be one of {BUCKETS + ('natural',)}, got {forced!r}")
            return None if forced == "natural" else str(forced)
        return self.curriculum.draw(rng, self.progress)

    def internal_opinions(
        self,
        case: MedCase,
        consulted: Sequence[str],
        rng: np.random.Generator,
        bucket: str | None,
        make_obs: Callable[[str], dict],
    ) -> tuple[dict[str, Opinion], list[str]]:
        """Opinions of the consulted specialists the env runs itself (scripted and policies).

        Scripted specialists follow the bucket jointly; policy replies are parsed, and a
        malformed one gives no opinion (its error is returned).
        """
        scripted = [self.backends[s] for s in consulted if isinstance(self.backends[s], ScriptedSpecialist)]
        out = {o.specialty: o for o in scripted_opinions(case, scripted, rng, bucket, self.wrong_agreement)}
        errors: list[str] = []
        for s in consulted:
            b = self.backends[s]
            if isinstance(b, ScriptedSpecialist) or b == "agent":
                continue
            reply = policy_reply(b, make_obs(s), role_system_prompt("specialist", s))
            op, err = opinion_from_reply(s, reply, case)
            if op is None:
                errors.append(f"specialist_{s}: {err}")
                log.debug("specialist %s gave no valid opinion: %s", s, err)
            else:
                out[s] = op
        return out, errors
