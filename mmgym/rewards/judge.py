"""Judge and rubric rewards (RubiCap; "Reward and Guidance through Rubrics").

A task carries a :class:`TaskRubric`: weighted criteria. A :class:`Judge` scores a
response against the question, the reference and the rubric, one score per criterion
plus a rationale. The reward is the weighted sum of the criterion scores (rescaled to
[0, 1], weights normalised to sum to 1).

Backends:
- :class:`RuleJudge`: deterministic rules per criterion (keywords, a reference match or
  a custom check) -- for tests, baselines and rubric items that need no model;
- :class:`PolicyJudge`: any policy with ``generate(conversations, sampling)`` (the same
  HF / vLLM code path as the agent), prompted as a judge, its JSON verdict parsed. It is
  duck-typed: this module imports nothing from ``mmgym.agents``.

:class:`JudgeScorer` batches judge calls, caches verdicts by a hash of (response,
rubric, question, reference), and never raises on a judge's behalf: a judge that raises
or times out, a verdict that cannot be parsed, misses a criterion or has a score outside
the judge's range all score 0 and are counted in ``scorer.metrics()``. Use
:func:`judge_reward_term` to put it in a ``Rubric``; call ``scorer.score(requests)`` on
the whole batch first (the score step) and the per-episode terms then hit the cache.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from mmgym.rewards.rubric import RUBRICS, RewardContext, RewardFn, Rubric, _fmt01, _metric
from mmgym.rewards.verifiers import normalize_text

__all__ = [
    "Criterion",
    "Judge",
    "JudgeRequest",
    "JudgeResult",
    "JudgeScorer",
    "PolicyJudge",
    "RuleJudge",
    "TaskRubric",
    "Verdict",
    "judge_prompt",
    "judge_reward_term",
    "parse_verdict",
]

JudgeStatus = Literal["ok", "cached", "failed", "timeout", "unparsable", "out_of_range"]


@dataclass(frozen=True, slots=True)
class Criterion:
    """One rubric item.

    ``description`` is what the judge reads; ``keywords`` (any of which must appear, as
    normalised words, for the RuleJudge) and ``check(response, reference) -> float in
    [0, 1]`` are used only by :class:`RuleJudge`.
    """

    name: str
    weight: float = 1.0
    description: str = ""
    keywords: tuple[str, ...] = ()
    check: Callable[[str, str | None], float] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a rubric criterion needs a non-empty name, got {self.name!r}")
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"criterion {self.name!r}: weight must be a finite number >= 0, got {self.weight!r}")
        if isinstance(self.keywords, str):  # a bare string would be read as characters
            object.__setattr__(self, "keywords", (self.keywords,))


@dataclass(frozen=True, slots=True)
class TaskRubric:
    """A task's rubric: weighted criteria with unique names and a positive total weight."""

    criteria: tuple[Criterion, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "criteria", tuple(self.criteria))
        if not self.criteria:
            raise ValueError("a TaskRubric needs at least one Criterion")
        names = [c.name for c in self.criteria]
        if len(set(names)) != len(names):
            raise ValueError(f"rubric criterion names must be unique, got {names}")
        if not sum(c.weight for c in self.criteria) > 0:
            raise ValueError(f"rubric weights sum to 0 ({names}); give at least one criterion a weight > 0")

    @classmethod
    def from_dicts(cls, items: Sequence[Mapping[str, Any]]) -> TaskRubric:
        """From dataset rows: ``[{"name": ..., "weight": ..., "description": ..., "keywords": [...]}, ...]``."""
        crits = []
        for i, it in enumerate(items):
            if not isinstance(it, Mapping) or "name" not in it:
                raise ValueError(f"rubric item {i} must be a mapping with a 'name', got {it!r}")
            crits.append(
                Criterion(
                    name=str(it["name"]),
                    weight=float(it.get("weight", 1.0)),
                    description=str(it.get("description", "")),
                    keywords=tuple(str(k) for k in it.get("keywords", ())),
                )
            )
        return cls(tuple(crits))

    def key(self) -> str:
        """Stable text identifying the rubric (for the cache): names, weights, descriptions, keywords."""
        return json.dumps([[c.name, c.weight, c.description, list(c.keywords)] for c in self.criteria], sort_keys=True)

    def combine(self, scores: Mapping[str, float]) -> float:
        """Weighted sum of per-criterion scores in [0, 1], weights normalised: sum w_c s_c / sum w_c."""
        total = sum(c.weight for c in self.criteria)
        return float(sum(c.weight * float(scores.get(c.name, 0.0)) for c in self.criteria) / total)


@dataclass(frozen=True, slots=True)
class JudgeRequest:
    """What a judge sees: the question, the response, an optional reference answer and the rubric."""

    question: str
    response: str
    rubric: TaskRubric
    reference: str | None = None

    def cache_key(self) -> str:
        payload = json.dumps([self.response, self.rubric.key(), self.question, self.reference])
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass(slots=True)
class Verdict:
    """A judge's answer: raw per-criterion scores (in the judge's ``score_range``) and a
    rationale. ``error`` set means the judge could not produce one (e.g. unparsable text)."""

    scores: dict[str, float]
    rationale: str = ""
    error: str | None = None


@dataclass(slots=True)
class JudgeResult:
    """One scored request: ``reward`` in [0, 1] (0 unless ``status`` is ok/cached),
    ``scores`` rescaled to [0, 1], the rationale and what happened."""

    reward: float
    scores: dict[str, float]
    rationale: str
    status: JudgeStatus
    error: str | None = None


@runtime_checkable
class Judge(Protocol):
    """Scores requests in batches. ``score_range`` = (lowest, highest) raw score."""

    score_range: tuple[float, float]

    def judge(self, requests: Sequence[JudgeRequest]) -> list[Verdict]: ...


# --------------------------------------------------------------------------- rule judge


def _contains(text_norm: str, phrase: str) -> bool:
    p = normalize_text(phrase)
    return bool(p) and f" {p} " in f" {text_norm} "


class RuleJudge:
    """Deterministic judge, scores in [0, 1]. Per criterion, the first that applies:

    1. ``check(response, reference)`` (clipped to [0, 1]);
    2. ``keywords``: the fraction of keywords found as whole normalised words/phrases;
    3. otherwise 1 if the normalised reference occurs in the response, else 0.
    """

    score_range: tuple[float, float] = (0.0, 1.0)

    def judge(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        out = []
        for req in requests:
            text = normalize_text(req.response)
            scores, notes = {}, []
            for c in req.rubric.criteria:
                if c.check is not None:
                    s = min(max(float(c.check(req.response, req.reference)), 0.0), 1.0)
                    notes.append(f"{c.name}: check -> {s:g}")
                elif c.keywords:
                    hits = [k for k in c.keywords if _contains(text, k)]
                    s = len(hits) / len(c.keywords)
                    notes.append(f"{c.name}: {len(hits)}/{len(c.keywords)} keywords")
                else:
                    s = 1.0 if req.reference is not None and _contains(text, req.reference) else 0.0
                    notes.append(f"{c.name}: reference {'found' if s else 'missing'}")
                scores[c.name] = s
            out.append(Verdict(scores=scores, rationale="; ".join(notes)))
        return out


# --------------------------------------------------------------------------- policy judge

_JUDGE_SYSTEM = (
    "You are a strict grader. Score the response against each rubric criterion with an "
    "integer from {lo:g} to {hi:g}. Reply with one JSON object and nothing else: "
    '{{"scores": {{"<criterion name>": <score>, ...}}, "rationale": "<one or two sentences>"}}'
)


def judge_prompt(req: JudgeRequest, *, score_range: tuple[float, float] = (0.0, 10.0)) -> tuple[str, str]:
    """(system, user) text of the judge prompt for one request."""
    lo, hi = score_range
    lines = [f"Question:\n{req.question}", ""]
    if req.reference is not None:
        lines += [f"Reference answer:\n{req.reference}", ""]
    lines += [f"Response to grade:\n{req.response}", "", "Rubric (name: what earns full marks):"]
    lines += [f"- {c.name} (weight {c.weight:g}): {c.description or c.name}" for c in req.rubric.criteria]
    return _JUDGE_SYSTEM.format(lo=lo, hi=hi), "\n".join(lines)


_LINE_SCORE = re.compile(r"^\s*[-*]?\s*([^:\n]+?)\s*[:=]\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*\d+(?:\.\d+)?)?\s*$", re.M)


def _json_objects(text: str) -> list[str]:
    """Balanced ``{...}`` spans of ``text`` (outermost only), in order."""
    spans, depth, start, in_str, esc = [], 0, -1, False, False
    for i, ch in enumerate(text):
        if in_str:
            esc = (ch == "\\") and not esc
            if ch == '"' and not esc:
                in_str = False
            continue
        if ch == '"' and depth > 0:
            in_str = True
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                spans.append(text[start : i + 1])
    return spans


def parse_verdict(text: str, criteria: Sequence[str]) -> Verdict:
    """Parse a judge's reply: the last JSON object with a ``scores`` mapping (or a flat
    ``{criterion: score}`` object), else ``name: score`` lines. Never raises: a reply
    without a score for every criterion gives a Verdict with ``error`` set."""
    if not isinstance(text, str):
        return Verdict({}, error=f"judge reply is {type(text).__name__}, not text")
    wanted = set(criteria)
    found: set[str] = set()  # criteria seen in the most complete candidate, for the error
    for span in reversed(_json_objects(text)):
        try:
            obj = json.loads(span)
        except (json.JSONDecodeError, RecursionError):
            continue
        if not isinstance(obj, dict):
            continue
        raw = obj.get("scores", obj)
        if not isinstance(raw, dict):
            continue
        scores = {}
        for k, v in raw.items():
            if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                continue
            try:
                scores[str(k)] = float(v)
            except ValueError:
                continue
        if wanted <= set(scores):
            rationale = obj.get("rationale", "")
            return Verdict({k: scores[k] for k in criteria}, rationale=str(rationale))
        found = max(found, wanted & set(scores), key=len)
    scores = {m.group(1).strip(): float(m.group(2)) for m in _LINE_SCORE.finditer(text)}
    if wanted <= set(scores):
        return Verdict({k: scores[k] for k in criteria}, rationale=text.strip()[:500])
    found = max(found, wanted & set(scores), key=len)
    missing = sorted(wanted - found)
    return Verdict({}, rationale=text[:500], error=f"no score for criteria {missing} in the judge's reply")


class PolicyJudge:
    """A policy prompted as a judge (the agent's own HF / vLLM code path).

    Args:
      policy: any object with ``generate(conversations, sampling) -> [obj with .text]``
        (an ``mmgym.agents`` Policy; not imported here).
      sampling: passed to ``generate`` as is (e.g. ``SamplingParams(temperature=0,
        max_new_tokens=256)``).
      make_conversation: ``(system, user) -> conversation`` in the policy's type, e.g.
        ``lambda s, u: Conversation(system=s, messages=[Message("user", u)])``.
      score_range: the integer scale the judge is asked for (default 0-10).
    """

    def __init__(
        self,
        policy: Any,
        sampling: Any,
        *,
        make_conversation: Callable[[str, str], Any],
        score_range: tuple[float, float] = (0.0, 10.0),
    ):
        if not callable(getattr(policy, "generate", None)):
            raise TypeError(f"PolicyJudge needs an object with generate(conversations, sampling), got {type(policy).__name__}")
        if not callable(make_conversation):
            raise TypeError("PolicyJudge needs make_conversation: (system, user) -> conversation of the policy's type")
        lo, hi = score_range
        if not hi > lo:
            raise ValueError(f"score_range must be (low, high) with high > low, got {score_range}")
        self.policy = policy
        self.sampling = sampling
        self.make_conversation = make_conversation
        self.score_range = (float(lo), float(hi))

    def judge(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        convs = [self.make_conversation(*judge_prompt(r, score_range=self.score_range)) for r in requests]
        gens = self.policy.generate(convs, self.sampling)
        if len(gens) != len(requests):
            raise RuntimeError(f"judge policy returned {len(gens)} generations for {len(requests)} requests")
        return [
            parse_verdict(getattr(g, "text", g), [c.name for c in r.rubric.criteria]) for g, r in zip(gens, requests)
        ]


# --------------------------------------------------------------------------- scorer

_COUNTERS = (
    "judge_requests",
    "judge_calls",
    "judge_cache_hits",
    "judge_failures",
    "judge_timeouts",
    "judge_unparsable",
    "judge_out_of_range",
)


class JudgeScorer:
    """Batched, cached, failure-proof rubric scoring with any :class:`Judge`.

    Args:
      judge: the backend.
      batch_size: requests per judge call.
      cache_size: verdicts kept (least recently used dropped); 0 disables the cache.
      timeout_s: seconds one judge call may take (None: no limit). A call past it scores
        its requests 0 (its thread is abandoned, not killed: the judge should also
        bound its own generation length).

    ``metrics()`` returns counters (floats) for the trainer's metrics: judge_requests,
    judge_calls, judge_cache_hits, judge_failures (raised or timed out), judge_timeouts,
    judge_unparsable (no score for every criterion), judge_out_of_range (a non-finite
    score or one outside ``judge.score_range``). Only verdicts that scored are cached.
    """

    def __init__(self, judge: Judge, *, batch_size: int = 16, cache_size: int = 65536, timeout_s: float | None = None):
        if not callable(getattr(judge, "judge", None)):
            raise TypeError(f"JudgeScorer needs a Judge with judge(requests) -> [Verdict], got {type(judge).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s}")
        lo, hi = getattr(judge, "score_range", (0.0, 1.0))
        if not hi > lo:
            raise ValueError(f"judge.score_range must be (low, high) with high > low, got {(lo, hi)}")
        self.judge = judge
        self.batch_size = batch_size
        self.cache_size = cache_size
        self.timeout_s = timeout_s
        self.score_range = (float(lo), float(hi))
        self._cache: OrderedDict[str, JudgeResult] = OrderedDict()
        self._counts = dict.fromkeys(_COUNTERS, 0)

    def metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in self._counts.items()}

    def reset_metrics(self) -> None:
        self._counts = dict.fromkeys(_COUNTERS, 0)

    def score(self, requests: Sequence[JudgeRequest]) -> list[JudgeResult]:
        """Score every request; identical requests (and cached ones) are judged once."""
        self._counts["judge_requests"] += len(requests)
        keys = [r.cache_key() for r in requests]
        results: dict[str, JudgeResult] = {}
        todo: dict[str, JudgeRequest] = {}
        for key, req in zip(keys, requests):
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self._counts["judge_cache_hits"] += 1
                results[key] = JudgeResult(hit.reward, dict(hit.scores), hit.rationale, "cached")
            elif key not in todo:
                todo[key] = req
        items = list(todo.items())
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            for (key, req), res in zip(chunk, self._judge_chunk([r for _, r in chunk])):
                results[key] = res
                if res.status == "ok" and self.cache_size:
                    self._cache[key] = res
                    if len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
        return [results[k] for k in keys]

    def _call(self, reqs: list[JudgeRequest]) -> list[Verdict]:
        if self.timeout_s is None:
            return self.judge.judge(reqs)
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        try:
            return pool.submit(self.judge.judge, reqs).result(timeout=self.timeout_s)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _judge_chunk(self, reqs: list[JudgeRequest]) -> list[JudgeResult]:
        self._counts["judge_calls"] += 1
        try:
            verdicts = self._call(reqs)
            if not isinstance(verdicts, (list, tuple)) or len(verdicts) != len(reqs):
                raise RuntimeError(f"judge returned {type(verdicts).__name__} for {len(reqs)} requests")
        except concurrent.futures.TimeoutError:
            self._counts["judge_failures"] += len(reqs)
            self._counts["judge_timeouts"] += len(reqs)
            return [JudgeResult(0.0, {}, "", "timeout", f"judge call exceeded {self.timeout_s} s") for _ in reqs]
        except Exception as e:  # a judge's failure must never crash a rollout
            self._counts["judge_failures"] += len(reqs)
            return [JudgeResult(0.0, {}, "", "failed", f"{type(e).__name__}: {e}") for _ in reqs]
        return [self._check(req, v) for req, v in zip(reqs, verdicts)]

    def _check(self, req: JudgeRequest, verdict: Any) -> JudgeResult:
        lo, hi = self.score_range
        scores = getattr(verdict, "scores", None)
        error = getattr(verdict, "error", None)
        rationale = str(getattr(verdict, "rationale", ""))
        names = [c.name for c in req.rubric.criteria]
        if error is not None or not isinstance(scores, Mapping) or not set(names) <= set(scores):
            self._counts["judge_unparsable"] += 1
            why = error or f"verdict lacks scores for {names}"
            return JudgeResult(0.0, {}, rationale, "unparsable", str(why))
        scaled = {}
        for n in names:
            v = scores[n]
            try:
                x = float(v)
            except (TypeError, ValueError):
                x = math.nan
            if isinstance(v, bool) or not math.isfinite(x) or not lo <= x <= hi:
                self._counts["judge_out_of_range"] += 1
                return JudgeResult(0.0, {}, rationale, "out_of_range", f"criterion {n!r} scored {v!r}, outside [{lo:g}, {hi:g}]")
            scaled[n] = (x - lo) / (hi - lo)
        return JudgeResult(req.rubric.combine(scaled), scaled, rationale, "ok")


# --------------------------------------------------------------------------- rubric terms


def judge_reward_term(
    scorer: JudgeScorer,
    request_fn: Callable[[RewardContext], JudgeRequest | None],
    *,
    name: str = "rubric",
    weight: float = 1.0,
) -> RewardFn:
    """A ``Rubric`` term scoring the episode's answer with ``scorer``.

    ``request_fn(ctx)`` builds the request (the env knows the task: question, reference,
    its ``TaskRubric``) or returns None (the term scores 0). Failures score 0 and are
    counted by the scorer; the term never raises.
    """

    def fn(ctx: RewardContext) -> float:
        req = request_fn(ctx)
        if req is None:
            return 0.0
        return scorer.score([req])[0].reward

    fn.__name__ = f"judge_{name}"
    return RewardFn(name, weight, fn)


@RUBRICS.register("rubric_judge")
def rubric_judge(weight: float = 1.0, format_weight: float = 0.1) -> Rubric:
    """Rubric reward scored in batch by the trainer (``JudgeScorer.score``) and handed to
    the env as ``metrics["rubric_score"]`` in [0, 1]: ``weight * rubric + 0.1 fmt``."""
    return Rubric([RewardFn("rubric", weight, _metric("rubric_score")), RewardFn("format", format_weight, _fmt01)])
