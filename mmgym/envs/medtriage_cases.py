"""Cases for the medical triage environments (MMedAgent-RL): procedural scans and a loader
for medical VQA datasets in the VQA-RAD / SLAKE / PathVQA JSON layouts.

A case is one image, one question and its verified answer, plus the modality, organ and
the specialty that should see it (what the triage doctor is rewarded for choosing).

Procedural scans: five modalities with distinct textures and layouts — chest X-ray
(ribs over dark lung fields), CT (dark field, body cross-section, bright bone), MRI (brain
with gyri-like folds), ultrasound (speckled fan sector) and histology (pink stroma with
purple nuclei) — over four organs (brain, chest, abdomen, tissue). A lesion-like finding
(mass, cyst or calcification) sits on the image's left or right and is small or large;
some scans are normal. Questions are multiple choice (finding type, side, size) or yes/no.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from mmgym.envs.datasets import DEFAULT_MAX_PIXELS, DatasetError, RowError, load_rgb, load_rows, probe_image, read_jsonl, resolve_in_root
from mmgym.rewards import LETTERS, choice_match, exact_match, normalize_text

__all__ = [
    "SPECIALTIES",
    "SPECIALTY_ORGANS",
    "MODALITIES",
    "FINDINGS",
    "QUESTION_TYPES",
    "MedCase",
    "MedVQARow",
    "procedural_case",
    "draw_scan",
    "medvqa_rows",
    "dataset_case",
    "specialty_for",
    "normalize_specialty",
    "verify_case",
]

# Specialty -> the organ it reads. The triage doctor is rewarded for the specialty whose
# organ matches the case (MMedAgent-RL assigns by modality/organ).
SPECIALTY_ORGANS: dict[str, str] = {"neuro": "brain", "chest": "chest", "abdomen": "abdomen", "pathology": "tissue"}
SPECIALTIES: tuple[str, ...] = tuple(SPECIALTY_ORGANS)
# Organ -> modalities that can show it.
MODALITIES: dict[str, tuple[str, ...]] = {
    "brain": ("mri", "ct"),
    "chest": ("xray", "ct"),
    "abdomen": ("ct", "ultrasound"),
    "tissue": ("histology",),
}
MODALITY_NAMES = {"mri": "MRI", "ct": "CT", "xray": "X-ray", "ultrasound": "ultrasound", "histology": "histology slide"}
FINDINGS: tuple[str, ...] = ("mass", "cyst", "calcification")
NORMAL = "no abnormality"
QUESTION_TYPES: tuple[str, ...] = ("finding", "side", "size", "presence", "side_yn")

_ALIASES = {
    "neurology": "neuro", "neuroradiology": "neuro", "brain": "neuro", "head": "neuro",
    "pulmonology": "chest", "thoracic": "chest", "lung": "chest", "cardiothoracic": "chest",
    "gastroenterology": "abdomen", "abdominal": "abdomen", "hepatology": "abdomen",
    "histopathology": "pathology", "histology": "pathology", "pathologist": "pathology",
}


def normalize_specialty(name: Any) -> str | None:
    """``"Specialist_Neuro"``, ``"neurology"`` -> ``"neuro"``; ``None`` if not a known specialty."""
    if not isinstance(name, str):
        return None
    s = name.strip().lower().replace(" ", "_")
    if s.startswith("specialist_"):
        s = s[len("specialist_"):]
    s = _ALIASES.get(s, s)
    return s if s in SPECIALTY_ORGANS else None


@dataclass(slots=True)
class MedCase:
    """One case. ``options`` empty means an open question verified by exact match on ``answer``.

    ``wrong_answers`` are plausible wrong answers a scripted specialist can give (option
    texts for choice questions, other answers of the dataset for open ones).
    """

    case_id: str
    image: np.ndarray
    question: str
    options: tuple[str, ...]
    correct: int
    answer: str
    modality: str
    organ: str
    specialty: str
    qtype: str = "finding"
    finding: dict[str, str] = field(default_factory=dict)
    wrong_answers: tuple[str, ...] = ()

    @property
    def answer_key(self) -> str:
        """What a correct reply puts in ``<answer>``: the option letter, or the open answer."""
        return LETTERS[self.correct] if self.options else self.answer

    def prompt(self) -> str:
        """``<image>`` + question (+ options); role instructions are appended by the env."""
        text = f"<image>\nQuestion: {self.question}"
        if self.options:
            text += "\nOptions: " + " ".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(self.options))
        return text


def verify_case(case: MedCase, answer: str | None) -> float:
    """1.0 if ``answer`` is right: option letter/text for choice questions, exact match for open."""
    if case.options:
        return choice_match(answer, case.options, case.correct)
    return exact_match(answer, case.answer)


# ---------------------------------------------------------------------- drawing
def _smooth_noise(rng: np.random.Generator, size: int, cells: int, sigma: float) -> np.ndarray:
    coarse = rng.normal(0.0, sigma, size=(cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _ellipse(img: np.ndarray, c: tuple[float, float], axes: tuple[float, float], value: float, thickness: int = -1) -> None:
    cv2.ellipse(img, (int(c[0]), int(c[1])), (max(1, int(axes[0])), max(1, int(axes[1]))), 0, 0, 360, float(value), thickness, cv2.LINE_AA)


def _layout(g: np.ndarray, organ: str, modality: str, s: int, rng: np.random.Generator) -> None:
    """Organ anatomy in grey levels (0 dark .. 1 bright), modality-specific contrast."""
    c = (s / 2, s / 2)
    if organ == "brain":
        skull = 0.95 if modality == "ct" else 0.12
        _ellipse(g, c, (0.40 * s, 0.46 * s), skull)
        _ellipse(g, c, (0.36 * s, 0.42 * s), 0.5 if modality == "ct" else 0.55)
        cv2.line(g, (int(s / 2), int(0.1 * s)), (int(s / 2), int(0.9 * s)), 0.3, max(1, s // 80))
        if modality == "mri":  # gyri-like folds: a modulated radial pattern
            yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
            r = np.hypot(xx - c[0], yy - c[1])
            ang = np.arctan2(yy - c[1], xx - c[0])
            folds = 0.12 * np.sin(r * 0.45 + 3.0 * np.sin(ang * 7 + float(rng.uniform(0, 6))))
            inside = g > 0.4
            g[inside] += folds[inside]
    elif organ == "chest":
        if modality == "xray":
            g[:] = 0.55
            for side in (-1, 1):
                _ellipse(g, (s / 2 + side * 0.2 * s, 0.5 * s), (0.15 * s, 0.33 * s), 0.15)
            for k in range(7):  # ribs: bright arcs over the lung fields
                y = int((0.22 + 0.09 * k) * s)
                cv2.ellipse(g, (int(s / 2), y), (int(0.38 * s), int(0.08 * s)), 0, 200, 340, 0.75, max(1, s // 60), cv2.LINE_AA)
            _ellipse(g, (s / 2, 0.55 * s), (0.07 * s, 0.3 * s), 0.8)
        else:
            _ellipse(g, c, (0.45 * s, 0.32 * s), 0.45)
            for side in (-1, 1):
                _ellipse(g, (s / 2 + side * 0.2 * s, 0.48 * s), (0.15 * s, 0.22 * s), 0.06)
            _ellipse(g, (s / 2, 0.76 * s), (0.05 * s, 0.04 * s), 0.95)
    elif organ == "abdomen":
        if modality == "ultrasound":
            poly = np.array([[s / 2, 0.05 * s], [0.05 * s, 0.9 * s], [0.95 * s, 0.9 * s]], np.int32)
            cv2.fillPoly(g, [poly], 0.45)
            cv2.ellipse(g, (int(s / 2), int(0.05 * s)), (int(0.6 * s), int(0.6 * s)), 0, 40, 140, 0.8, max(1, s // 50), cv2.LINE_AA)
        else:
            _ellipse(g, c, (0.45 * s, 0.36 * s), 0.45)
            _ellipse(g, (0.34 * s, 0.45 * s), (0.14 * s, 0.16 * s), 0.58)  # liver
            for side in (-1, 1):
                _ellipse(g, (s / 2 + side * 0.16 * s, 0.66 * s), (0.05 * s, 0.07 * s), 0.62)  # kidneys
            _ellipse(g, (s / 2, 0.72 * s), (0.05 * s, 0.04 * s), 0.95)


def _lesion(g: np.ndarray, finding: dict[str, str], s: int, rng: np.random.Generator, base: float) -> None:
    side, size, kind = finding["side"], finding["size"], finding["type"]
    r = s * (float(rng.uniform(0.045, 0.065)) if size == "small" else float(rng.uniform(0.11, 0.14)))
    cx = s * (float(rng.uniform(0.26, 0.38)) if side == "left" else float(rng.uniform(0.62, 0.74)))
    cy = s * float(rng.uniform(0.4, 0.6))
    if kind == "mass":  # solid, irregular, brighter than its surroundings
        pts = [(cx + r * (0.75 + 0.35 * rng.random()) * math.cos(a), cy + r * (0.75 + 0.35 * rng.random()) * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 11)[:-1]]
        cv2.fillPoly(g, [np.array(pts, np.int32)], float(min(1.0, base + 0.35)), cv2.LINE_AA)
    elif kind == "cyst":  # round, dark, thin bright wall
        _ellipse(g, (cx, cy), (r, r), 0.03)
        _ellipse(g, (cx, cy), (r, r), float(min(1.0, base + 0.3)), max(1, s // 100))
    else:  # calcification: a cluster of tiny very bright dots
        n = 5 if size == "small" else 12
        for _ in range(n):
            a, d = float(rng.uniform(0, 2 * math.pi)), r * math.sqrt(float(rng.random()))
            _ellipse(g, (cx + d * math.cos(a), cy + d * math.sin(a)), (max(1.0, s / 120), max(1.0, s / 120)), 1.0)


def _histology(s: int, rng: np.random.Generator, finding: dict[str, str] | None) -> np.ndarray:
    img = np.empty((s, s, 3), np.float32)
    img[:] = (235, 190, 215)
    img += _smooth_noise(rng, s, 10, 12.0)[..., None]
    n = int(s * s / 90)
    for _ in range(n):
        x, y = float(rng.uniform(0, s)), float(rng.uniform(0, s))
        cv2.ellipse(img, (int(x), int(y)), (int(rng.uniform(1, 3)), int(rng.uniform(1, 2))), float(rng.uniform(0, 180)), 0, 360, (120, 60, 150), -1)
    if finding:
        r = s * (0.06 if finding["size"] == "small" else 0.13)
        cx = s * (0.32 if finding["side"] == "left" else 0.68) + float(rng.uniform(-0.05, 0.05)) * s
        cy = s * float(rng.uniform(0.4, 0.6))
        if finding["type"] == "cyst":
            cv2.circle(img, (int(cx), int(cy)), int(r), (250, 245, 250), -1, cv2.LINE_AA)
        else:
            col, count = ((70, 20, 110), int(r * r / 3)) if finding["type"] == "mass" else ((40, 40, 160), int(r))
            for _ in range(count):
                a, d = float(rng.uniform(0, 2 * math.pi)), r * math.sqrt(float(rng.random()))
                cv2.circle(img, (int(cx + d * math.cos(a)), int(cy + d * math.sin(a))), 2 if finding["type"] == "mass" else 1, col, -1)
    return np.clip(img, 0, 255).astype(np.uint8)


def draw_scan(rng: np.random.Generator, modality: str, organ: str, finding: dict[str, str] | None, size: int = 160) -> np.ndarray:
    """A synthetic ``(size, size, 3)`` uint8 "scan" of ``organ`` in ``modality``, with the finding drawn."""
    if modality not in MODALITY_NAMES or organ not in MODALITIES or modality not in MODALITIES[organ]:
        raise ValueError(f"no scan for modality {modality!r} of organ {organ!r}; valid: {MODALITIES}")
    if modality == "histology":
        return _histology(size, rng, finding)
    g = np.zeros((size, size), np.float32)
    _layout(g, organ, modality, size, rng)
    if finding:
        _lesion(g, finding, size, rng, base=0.5)
    if modality == "ultrasound":  # multiplicative speckle inside the sector
        g *= rng.rayleigh(0.8, size=g.shape).astype(np.float32)
    elif modality == "xray":
        g = cv2.GaussianBlur(g, (0, 0), size / 120) + _smooth_noise(rng, size, 8, 0.04)
    elif modality == "mri":
        g = cv2.GaussianBlur(g, (0, 0), size / 200) + rng.normal(0, 0.02, g.shape).astype(np.float32)
    else:  # ct: fine quantum noise
        g += rng.normal(0, 0.035, g.shape).astype(np.float32)
    gray = np.clip(g * 255.0, 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


# ---------------------------------------------------------------------- questions
def _question(rng: np.random.Generator, qtype: str, finding: dict[str, str] | None) -> tuple[str, tuple[str, ...], int]:
    if qtype == "finding":
        opts = [FINDINGS[i] for i in rng.permutation(len(FINDINGS))] + [NORMAL]
        truth = finding["type"] if finding else NORMAL
        return "What is the most likely finding in this image?", tuple(opts), opts.index(truth)
    if qtype == "side":
        return "On which side of the image is the lesion?", ("left", "right"), 0 if finding["side"] == "left" else 1
    if qtype == "size":
        return "Is the lesion small or large?", ("small", "large"), 0 if finding["size"] == "small" else 1
    if qtype == "presence":
        asked = FINDINGS[int(rng.integers(len(FINDINGS)))]
        yes = bool(finding) and finding["type"] == asked
        return f"Is there a {asked} in this image?", ("yes", "no"), 0 if yes else 1
    side = ("left", "right")[int(rng.integers(2))]
    return f"Is the lesion on the {side} side of the image?", ("yes", "no"), 0 if finding["side"] == side else 1


def procedural_case(
    rng: np.random.Generator,
    case_id: str,
    *,
    size: int = 160,
    p_normal: float = 0.15,
    question_types: Sequence[str] = QUESTION_TYPES,
) -> MedCase:
    """Draw one procedural case with ``rng`` only."""
    specialty = SPECIALTIES[int(rng.integers(len(SPECIALTIES)))]
    organ = SPECIALTY_ORGANS[specialty]
    modality = MODALITIES[organ][int(rng.integers(len(MODALITIES[organ])))]
    normal = bool(rng.random() < p_normal)
    finding = None if normal else {
        "type": FINDINGS[int(rng.integers(len(FINDINGS)))],
        "side": ("left", "right")[int(rng.integers(2))],
        "size": ("small", "large")[int(rng.integers(2))],
    }
    allowed = [q for q in question_types if finding or q in ("finding", "presence")] or ["finding"]
    qtype = allowed[int(rng.integers(len(allowed)))]
    question, options, correct = _question(rng, qtype, finding)
    image = draw_scan(rng, modality, organ, finding, size)
    return MedCase(
        case_id=case_id, image=image, question=question, options=options, correct=correct,
        answer=options[correct], modality=modality, organ=organ, specialty=specialty, qtype=qtype,
        finding=dict(finding or {}), wrong_answers=tuple(o for i, o in enumerate(options) if i != correct),
    )


# ---------------------------------------------------------------------- datasets
_IMAGE_KEYS = ("img_name", "image_name", "image", "img_id", "image_path")
_ORGAN_KEYS = ("location", "image_organ", "organ")
_IMAGE_DIRS = ("", "imgs", "images", "VQA_RAD Image Folder", "Images")
_ORGAN_WORDS = {
    "neuro": ("brain", "head", "skull", "neck"),
    "chest": ("chest", "lung", "heart", "thorax", "breast"),
    "abdomen": ("abd", "liver", "kidney", "pelvi", "bowel", "colon", "spleen", "stomach", "pancrea"),
}


def specialty_for(organ: str, modality: str, default: str) -> str:
    """Map a dataset's organ / modality fields to a specialty (pathology modalities first)."""
    m, o = modality.lower(), organ.lower()
    if any(w in m for w in ("patholog", "histo", "microscop")):
        return "pathology"
    for spec, words in _ORGAN_WORDS.items():
        if any(w in o for w in words):
            return spec
    if "mr" in m.split() or m.startswith("mri"):
        return "neuro"
    return default


@dataclass(slots=True)
class MedVQARow:
    path: Path
    question: str
    answer: str
    closed: bool
    modality: str
    organ: str
    specialty: str
    qid: str


def _find_image(base: Path, name: Any) -> Path:
    last: RowError | None = None
    for sub in _IMAGE_DIRS:
        try:
            p = resolve_in_root(base, f"{sub}/{name}" if sub and isinstance(name, str) else name)
        except RowError as e:
            last = e
            continue
        if p.is_file():
            return p
    if last is not None and "escapes" in str(last):
        raise last
    raise RowError(f"image {str(name)[:80]!r} does not exist")


def _iter_items(path: Path) -> list[Any]:
    if path.suffix == ".jsonl":
        return [obj for _, obj in read_jsonl(path)]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DatasetError(f"medical VQA file {str(path)!r} is not readable JSON ({type(e).__name__}); give a JSON list or JSONL of rows") from None
    if isinstance(data, dict):  # {"data": [...]} or {"qid": row, ...}
        data = data.get("data", list(data.values()))
    if not isinstance(data, list):
        raise DatasetError(f"medical VQA file {str(path)!r} must hold a list of rows, got {type(data).__name__}")
    return data


def medvqa_rows(path: str | Path, *, image_root: str | Path | None = None, lang: str = "en", default_specialty: str = "pathology", max_pixels: int = DEFAULT_MAX_PIXELS) -> list[MedVQARow]:
    """Rows of a medical VQA JSON/JSONL file in the VQA-RAD / SLAKE / PathVQA layout.

    Keys read: image (``img_name`` SLAKE, ``image_name`` VQA-RAD, or ``image``), ``question``,
    ``answer``, ``answer_type`` (``CLOSED``/``OPEN``; yes/no answers count as closed),
    ``modality`` and organ (``location`` SLAKE, ``image_organ`` VQA-RAD) when present, ``q_lang``
    (SLAKE; rows in other languages than ``lang`` are dropped), ``qid``. Images are looked up
    under ``image_root`` (default: the file's folder) directly or in ``imgs/``, ``images/`` or
    ``VQA_RAD Image Folder/``. Rows without organ or modality (PathVQA) go to ``default_specialty``.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"medical VQA file {str(path)!r} does not exist; pass the JSON/JSONL file of rows (e.g. SLAKE test.json)")
    if normalize_specialty(default_specialty) is None:
        raise ValueError(f"default_specialty {default_specialty!r} unknown; known: {', '.join(SPECIALTIES)}")
    base = Path(image_root) if image_root is not None else path.parent
    items = [it for it in _iter_items(path) if not (isinstance(it, dict) and lang and it.get("q_lang", lang) != lang)]

    def parse(item: Any) -> MedVQARow:
        if not isinstance(item, dict):
            raise RowError("row missing fields (not a JSON object)")
        name = next((item[k] for k in _IMAGE_KEYS if isinstance(item.get(k), str)), None)
        q, a = item.get("question"), item.get("answer")
        if name is None or not isinstance(q, str) or not q.strip() or isinstance(a, (dict, list)) or a is None:
            raise RowError("row missing image/question/answer")
        answer = str(a).strip()
        if not answer:
            raise RowError("row missing answer")
        img = _find_image(base, name)
        probe_image(img, max_pixels)
        organ = next((str(item[k]) for k in _ORGAN_KEYS if item.get(k)), "")
        modality = str(item.get("modality") or "")
        closed = str(item.get("answer_type", "")).upper() == "CLOSED" or normalize_text(answer) in ("yes", "no")
        spec = specialty_for(organ, modality, normalize_specialty(default_specialty) or "pathology")
        return MedVQARow(img, q.strip(), answer, closed, modality or "unknown", organ or "unknown", spec, str(item.get("qid", name)))

    rows, _ = load_rows(str(path), items, parse)
    return rows


def dataset_case(row: MedVQARow, rng: np.random.Generator, pool: Sequence[str], max_side: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> MedCase:
    """A ``MedCase`` from a dataset row; yes/no answers become options, others stay open.

    ``pool`` holds other answers of the dataset, used as plausible wrong opinions.
    """
    try:
        image = load_rgb(row.path, max_pixels)
    except RowError:
        image = np.zeros((64, 64, 3), np.uint8)  # file changed since load: an unanswerable blank
    h, w = image.shape[:2]
    if max(h, w) > max_side:
        scale = max_side / max(h, w)
        image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    norm = normalize_text(row.answer)
    if norm in ("yes", "no"):
        options, correct = ("yes", "no"), (0 if norm == "yes" else 1)
        wrong: tuple[str, ...] = (options[1 - correct],)
    else:
        options, correct = (), -1
        cands = [p for p in pool if normalize_text(p) != norm]
        pick = rng.permutation(len(cands))[:3] if cands else []
        wrong = tuple(cands[int(i)] for i in pick) or ("unknown",)
    return MedCase(
        case_id=f"medvqa-{row.qid}", image=image, question=row.question, options=options, correct=correct,
        answer=row.answer, modality=row.modality, organ=row.organ, specialty=row.specialty,
        qtype="closed" if row.closed else "open", wrong_answers=wrong,
    )
