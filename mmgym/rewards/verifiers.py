"""Pure answer verifiers. Each takes the model's answer text and the reference and
returns a float in [0, 1] (or an IoU). None of them raises on odd input.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections.abc import Sequence
from typing import Any

from mmgym.core.text import tags_balanced

__all__ = [
    "normalize_text",
    "exact_match",
    "choice_match",
    "parse_choice",
    "numeric_match",
    "parse_number",
    "bbox_iou",
    "temporal_iou",
    "parse_span",
    "format_score",
    "LETTERS",
]

LETTERS = string.ascii_uppercase
_PUNCT = re.compile(r"[\s" + re.escape(string.punctuation) + r"]+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_text(s: str) -> str:
    """Lower-case, NFKC, punctuation and articles dropped, whitespace collapsed.

    >>> normalize_text("  The Red, Cube! ")
    'red cube'
    """
    s = unicodedata.normalize("NFKC", str(s)).lower()
    s = _PUNCT.sub(" ", s)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(answer: str | None, reference: str | Sequence[str]) -> float:
    """1.0 if the normalised answer equals the (or any) normalised reference.

    >>> exact_match("red.", ["Red", "crimson"])
    1.0
    """
    if answer is None:
        return 0.0
    refs = [reference] if isinstance(reference, str) else list(reference)
    a = normalize_text(answer)
    return float(bool(a) and any(a == normalize_text(r) for r in refs))


_CHOICE_RE = re.compile(r"^\(?\s*([A-Za-z])\s*(?:[\)\.:]|$|\s)")


def parse_choice(answer: str | None, options: Sequence[str]) -> int | None:
    """Index of the option the answer names, by letter (``B``, ``(B)``, ``B. text``) or by text."""
    if answer is None or not options:
        return None
    a = answer.strip()
    m = _CHOICE_RE.match(a)
    if m:
        idx = LETTERS.find(m.group(1).upper())
        if 0 <= idx < len(options):
            rest = a[m.end():].strip()
            # "B) the option text" must agree with option B if text follows
            if not rest or normalize_text(rest) == normalize_text(options[idx]) or len(a) <= 3:
                return idx
    na = normalize_text(a)
    for i, opt in enumerate(options):
        if na and na == normalize_text(opt):
            return i
    return None


def choice_match(answer: str | None, options: Sequence[str], correct: int) -> float:
    """1.0 if the answer picks option ``correct`` (by letter or exact option text).

    >>> choice_match("(B)", ["cat", "dog"], 1), choice_match("dog", ["cat", "dog"], 1)
    (1.0, 1.0)
    """
    return float(parse_choice(answer, options) == correct)


_NUM_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")


def parse_number(answer: str | None) -> float | None:
    """The first number in the text (``1,234.5``, ``-3e2``, ``40%`` -> 40.0); None if none."""
    if answer is None:
        return None
    m = _NUM_RE.search(answer)
    if not m:
        return None
    try:
        v = float(m.group(0).replace(",", ""))
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def numeric_match(answer: str | None, reference: float, *, rel_tol: float = 1e-6, abs_tol: float = 1e-6) -> float:
    """1.0 if the first number in the answer is within tolerance of ``reference``.

    >>> numeric_match("about 3.0 apples", 3), numeric_match("4", 3, abs_tol=0.5)
    (1.0, 0.0)
    """
    v = parse_number(answer)
    if v is None:
        return 0.0
    return float(math.isclose(v, float(reference), rel_tol=rel_tol, abs_tol=abs_tol))


def bbox_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``[x1, y1, x2, y2]`` boxes; 0 for degenerate boxes.

    >>> bbox_iou([0, 0, 2, 2], [1, 1, 3, 3])
    0.14285714285714285
    """
    try:
        ax1, ay1, ax2, ay2 = (float(v) for v in a)
        bx1, by1, bx2, by2 = (float(v) for v in b)
    except (TypeError, ValueError):
        return 0.0
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1) + max(0.0, bx2 - bx1) * max(0.0, by2 - by1) - inter
    if not math.isfinite(union) or union <= 0:
        return 0.0
    return inter / union


def temporal_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``[start, end]`` spans in seconds; 0 for empty or reversed spans.

    >>> temporal_iou([0, 4], [2, 6])
    0.3333333333333333
    """
    try:
        a0, a1 = (float(v) for v in a)
        b0, b1 = (float(v) for v in b)
    except (TypeError, ValueError):
        return 0.0
    if not all(math.isfinite(v) for v in (a0, a1, b0, b1)) or a1 <= a0 or b1 <= b0:
        return 0.0
    inter = max(0.0, min(a1, b1) - max(a0, b0))
    union = (a1 - a0) + (b1 - b0) - inter
    return inter / union if union > 0 else 0.0


_SPAN_RE = re.compile(r"\[?\s*(-?\d+(?:\.\d+)?)\s*(?:s|sec|seconds)?\s*(?:,|-|to|–)\s*(-?\d+(?:\.\d+)?)\s*(?:s|sec|seconds)?\s*\]?")


def parse_span(answer: str | None) -> tuple[float, float] | None:
    """``"[12.5, 17]"`` or ``"12.5 - 17 s"`` -> ``(12.5, 17.0)``; None if absent."""
    if answer is None:
        return None
    m = _SPAN_RE.search(answer)
    if not m:
        return None
    s, e = float(m.group(1)), float(m.group(2))
    return (s, e) if math.isfinite(s) and math.isfinite(e) else None


def format_score(text: str, *, require_think: bool = False) -> float:
    """1.0 if tags are balanced and a non-empty ``<answer>`` is present (and ``<think>`` if required)."""
    if not isinstance(text, str) or not tags_balanced(text):
        return 0.0
    m = re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)
    if not m or not m.group(1).strip():
        return 0.0
    if require_think:
        t = re.search(r"<think>(.*?)</think>", text, re.DOTALL)
        if not t or not t.group(1).strip():
            return 0.0
    return 1.0


def _as_list(x: Any) -> list[Any]:
    return list(x) if isinstance(x, (list, tuple)) else [x]
