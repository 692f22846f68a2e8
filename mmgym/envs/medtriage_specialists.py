"""Specialists, opinions, the C-MARL curriculum and scripted baselines for the medical
triage environments (MMedAgent-RL).

MMedAgent-RL's attending physician learns to follow specialists when they are right and
to overrule them when they are wrong, with a curriculum over cases bucketed by the
specialists' opinions: all correct (easy), conflicting (medium), all wrong (hard).

Scripted specialists are right with a per-specialty accuracy inside their specialty and
near chance outside it; a curriculum bucket overrides that and forces the pattern of
right and wrong opinions. ``wrong_agreement`` controls whether wrong specialists agree on
the same wrong answer. Any policy can stand in for a specialist: an object with
``generate(conversations, sampling)`` (mmgym's ``Policy``) or a callable ``(obs) -> str``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from mmgym.envs.medtriage_cases import MODALITY_NAMES, SPECIALTIES, SPECIALTY_ORGANS, MedCase, verify_case
from mmgym.rewards import LETTERS
from mmgym.tools import HermesParser

__all__ = [
    "BUCKETS",
    "Bucket",
    "Opinion",
    "CurriculumSchedule",
    "CURRICULA",
    "get_curriculum",
    "ScriptedSpecialist",
    "TextPolicy",
    "plan_correctness",
    "scripted_opinions",
    "opinion_from_reply",
    "format_opinion",
    "bucket_of",
    "policy_reply",
    "majority_attending",
    "oracle_attending",
    "clean_agent_text",
]

Bucket = Literal["correct", "conflict", "wrong"]
BUCKETS: tuple[str, ...] = ("correct", "conflict", "wrong")
_PARSER = HermesParser()


@runtime_checkable
class TextPolicy(Protocol):
    """Duck type of ``mmgym.agents.Policy`` (envs must not import agents): ``generate``
    returns one generation per conversation, each with a ``.text``."""

    def generate(self, conversations: list[Any], sampling: Any) -> list[Any]: ...


@dataclass(slots=True, frozen=True)
class Opinion:
    """One specialist's opinion: the answer key (letter or open text) and a short rationale."""

    specialty: str
    answer: str
    rationale: str
    correct: bool

    def render(self) -> str:
        return format_opinion(self.specialty, self.answer, self.rationale)


def clean_agent_text(text: str, limit: int = 400) -> str:
    """Agent-written text forwarded to another agent: no media placeholders or control tags."""
    for tag in ("<image>", "<video>", "<answer>", "</answer>", "<tool_call>", "</tool_call>", "<think>", "</think>"):
        text = text.replace(tag, " ")
    return " ".join(text.split())[:limit]


def format_opinion(specialty: str, answer: str, rationale: str) -> str:
    """``[from specialist_k] Answer: B (cyst). Rationale: ...`` (DESIGN §3 message format)."""
    return f"[from specialist_{specialty}] Answer: {clean_agent_text(answer, 120)}. Rationale: {clean_agent_text(rationale)}"


# ---------------------------------------------------------------------- curriculum
@dataclass(slots=True, frozen=True)
class CurriculumSchedule:
    """Bucket weights (correct, conflict, wrong) by training progress in [0, 1].

    ``stages`` is a sorted tuple of ``(start_progress, (w_correct, w_conflict, w_wrong))``;
    the last stage whose start is <= progress applies. ``None`` weights (the ``natural``
    schedule) mean no forcing: specialists answer with their own accuracies.
    """

    name: str
    stages: tuple[tuple[float, tuple[float, float, float]], ...] = ()

    def __post_init__(self) -> None:
        starts = [s for s, _ in self.stages]
        if starts != sorted(starts) or (starts and starts[0] != 0.0):
            raise ValueError(f"curriculum {self.name!r}: stage starts must be sorted and begin at 0.0, got {starts}")
        for _, w in self.stages:
            if len(w) != 3 or min(w) < 0 or sum(w) <= 0:
                raise ValueError(f"curriculum {self.name!r}: weights must be 3 non-negative numbers with a positive sum, got {w}")

    def weights(self, progress: float) -> tuple[float, float, float] | None:
        if not self.stages:
            return None
        w = self.stages[0][1]
        for start, ws in self.stages:
            if progress >= start:
                w = ws
        return w

    def draw(self, rng: np.random.Generator, progress: float) -> str | None:
        """A target bucket for the next case, or ``None`` (natural opinions)."""
        w = self.weights(progress)
        if w is None:
            return None
        p = np.asarray(w, dtype=np.float64) / float(sum(w))
        return BUCKETS[int(rng.choice(3, p=p))]


# C-MARL (MMedAgent-RL): easy -> medium -> hard as training progresses.
CURRICULA: dict[str, CurriculumSchedule] = {
    "natural": CurriculumSchedule("natural"),
    "uniform": CurriculumSchedule("uniform", ((0.0, (1.0, 1.0, 1.0)),)),
    "easy_to_hard": CurriculumSchedule("easy_to_hard", ((0.0, (1.0, 0.0, 0.0)), (0.25, (0.5, 0.5, 0.0)), (0.5, (0.3, 0.4, 0.3)), (0.75, (0.2, 0.4, 0.4)))),
    **{b: CurriculumSchedule(b, ((0.0, tuple(float(b == x) for x in BUCKETS)),)) for b in BUCKETS},
}


def get_curriculum(curriculum: str | CurriculumSchedule) -> CurriculumSchedule:
    if isinstance(curriculum, CurriculumSchedule):
        return curriculum
    if curriculum not in CURRICULA:
        raise ValueError(f"unknown curriculum {curriculum!r}; known: {', '.join(CURRICULA)} (or pass a CurriculumSchedule)")
    return CURRICULA[curriculum]


def bucket_of(opinions: Sequence[Opinion]) -> str:
    """``correct`` / ``wrong`` if every opinion is right / wrong, ``conflict`` if mixed, ``none`` if empty."""
    if not opinions:
        return "none"
    right = sum(o.correct for o in opinions)
    return "correct" if right == len(opinions) else "wrong" if right == 0 else "conflict"


def plan_correctness(rng: np.random.Generator, accuracies: Sequence[float], bucket: str | None) -> list[bool]:
    """Which of ``n`` opinions are right: natural draws from ``accuracies``, or forced by ``bucket``.

    A forced ``conflict`` over one opinion cannot conflict; it is right or wrong with p=0.5
    (the realised bucket in info then says ``correct`` or ``wrong``).
    """
    n = len(accuracies)
    if bucket is None:
        return [bool(rng.random() < a) for a in accuracies]
    if bucket == "correct":
        return [True] * n
    if bucket == "wrong":
        return [False] * n
    if n < 2:
        return [bool(rng.random() < 0.5)] * n
    k = int(rng.integers(1, n))  # 1..n-1 right opinions
    right = set(int(i) for i in rng.permutation(n)[:k])
    return [i in right for i in range(n)]


# ---------------------------------------------------------------------- scripted specialists
_PHRASES = {
    "mass": "a solid, irregular region brighter than its surroundings",
    "cyst": "a round, dark, well-defined lesion with a thin wall",
    "calcification": "a cluster of tiny very bright foci",
    "no abnormality": "no focal abnormality",
    "left": "the abnormality lies in the left half of the image",
    "right": "the abnormality lies in the right half of the image",
    "small": "the lesion occupies a small part of the field",
    "large": "the lesion occupies a large part of the field",
    "yes": "the finding asked about is present",
    "no": "the finding asked about is not present",
}


def _rationale(case: MedCase, answer_text: str, in_specialty: bool) -> str:
    where = f"On this {MODALITY_NAMES.get(case.modality, case.modality)} of the {case.organ}"
    lead = where if in_specialty else f"{where} (outside my specialty)"
    seen = _PHRASES.get(answer_text.lower(), f"the appearance fits '{answer_text}'")
    return f"{lead}, {seen}."


@dataclass(slots=True)
class ScriptedSpecialist:
    """A scripted specialist: right with ``accuracy`` inside its specialty and with
    ``outside_accuracy`` outside it (``None``: chance, 1 / number of options; 0.5 for open)."""

    specialty: str
    accuracy: float = 0.85
    outside_accuracy: float | None = None

    def __post_init__(self) -> None:
        if self.specialty not in SPECIALTY_ORGANS:
            raise ValueError(f"unknown specialty {self.specialty!r}; known: {', '.join(SPECIALTIES)}")
        for v in (self.accuracy, self.outside_accuracy):
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"specialist accuracies must lie in [0, 1], got {v}")

    def accuracy_on(self, case: MedCase) -> float:
        if case.specialty == self.specialty:
            return self.accuracy
        if self.outside_accuracy is not None:
            return self.outside_accuracy
        return 1.0 / len(case.options) if case.options else 0.5

    def opinion(self, case: MedCase, correct: bool, wrong_answer: str) -> Opinion:
        """The opinion given a decided correctness (and the wrong answer text to use)."""
        text = case.answer if correct else wrong_answer
        key = f"{LETTERS[case.options.index(text)]} ({text})" if case.options and text in case.options else text
        return Opinion(self.specialty, key, _rationale(case, text, case.specialty == self.specialty), bool(correct))


def scripted_opinions(
    case: MedCase,
    specialists: Sequence[ScriptedSpecialist],
    rng: np.random.Generator,
    bucket: str | None,
    wrong_agreement: float = 0.5,
) -> list[Opinion]:
    """Opinions of ``specialists`` on ``case``; with probability ``wrong_agreement`` all wrong
    specialists name the same wrong answer (a confident wrong majority), else each draws its own."""
    pattern = plan_correctness(rng, [s.accuracy_on(case) for s in specialists], bucket)
    wrongs = list(case.wrong_answers) or ["unknown"]
    shared = wrongs[int(rng.integers(len(wrongs)))]
    agree = bool(rng.random() < wrong_agreement)
    out = []
    for spec, ok in zip(specialists, pattern):
        wrong = shared if agree else wrongs[int(rng.integers(len(wrongs)))]
        out.append(spec.opinion(case, ok, wrong))
    return out


def opinion_from_reply(specialty: str, reply: str, case: MedCase) -> tuple[Opinion | None, str | None]:
    """Parse a specialist agent's reply (``<answer>...</answer>`` + rationale) into an ``Opinion``.

    Returns ``(None, error)`` for a malformed reply or a tool call (specialists only answer).
    """
    parsed = _PARSER.parse(reply)
    if parsed.error is not None:
        return None, parsed.error
    if parsed.answer is None:
        return None, "specialists give an opinion as <answer>...</answer> plus a short rationale; they have no tools"
    rest = re.sub(r"<answer>.*?</answer>", " ", reply, flags=re.DOTALL)
    ok = verify_case(case, parsed.answer) >= 1.0
    return Opinion(specialty, clean_agent_text(parsed.answer, 120), clean_agent_text(rest) or "(none given)", ok), None


def policy_reply(backend: Any, obs: Mapping[str, Any], system_prompt: str) -> str:
    """One reply from a ``TextPolicy`` (chat conversation with the images as content parts)
    or from a callable ``(obs) -> str``."""
    if isinstance(backend, TextPolicy):
        content = [{"type": "image", "image": img} for img in obs["images"]] + [{"type": "text", "text": obs["text"]}]
        conv = [{"role": "system", "content": system_prompt}, {"role": "user", "content": content}]
        out = backend.generate([conv], None)
        first = out[0] if out else ""
        text = getattr(first, "text", first)
        return text if isinstance(text, str) else ""
    if callable(backend):
        text = backend(dict(obs))
        return text if isinstance(text, str) else ""
    raise TypeError(f"a specialist backend must be a ScriptedSpecialist, an object with generate(conversations, sampling) or a callable (obs) -> str; got {type(backend).__name__}")


# ---------------------------------------------------------------------- attending baselines
_OPINION_RE = re.compile(r"\[from specialist_[^\]]*\] Answer: (.*?)\. Rationale:")


def majority_attending(text: str, fallback: str = "A") -> str:
    """Scripted attending that follows the majority of the ``[from specialist_k]`` opinions
    in its observation text (ties: the first-listed of the tied answers).

    >>> majority_attending("[from specialist_neuro] Answer: B (cyst). Rationale: x.\\n"
    ...                    "[from specialist_chest] Answer: B (cyst). Rationale: y.\\n"
    ...                    "[from specialist_abdomen] Answer: A (mass). Rationale: z.")
    '<answer>B</answer>'
    """
    keys = [re.sub(r"\s*\(.*\)$", "", m.group(1)).strip() for m in _OPINION_RE.finditer(text)]
    keys = [k for k in keys if k]
    if not keys:
        return f"<answer>{fallback}</answer>"
    counts = Counter(keys)
    top = max(counts.values())
    return f"<answer>{next(k for k in keys if counts[k] == top)}</answer>"


def oracle_attending(case: MedCase) -> str:
    """Scripted attending that reads the ground truth (the upper bound)."""
    return f"<answer>{case.answer_key}</answer>"
