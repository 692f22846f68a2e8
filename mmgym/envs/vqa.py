"""``mmgym/VQA-v0``: visual question answering with verifiable answers.

Procedural scenes of coloured shapes with colour, shape, count and position questions,
answered as a choice letter, an exact word or a number. A JSONL dataset loader takes
rows ``{"image": rel_path, "question": ..., "options": [...]?, "answer": ...,
"answer_type": "choice" | "exact" | "numeric"?}`` with images under the dataset root.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmgym.core import ToolCall
from mmgym.envs.base import MMEnv, Task, Verdict
from mmgym.envs.datasets import DEFAULT_MAX_PIXELS, DatasetError, RowError, load_rgb, load_rows, probe_image, read_jsonl, resolve_in_root
from mmgym.envs.scenes import PALETTE, background, draw_shape
from mmgym.rewards import LETTERS, choice_match, exact_match, numeric_match
from mmgym.tools import BBoxZoomTool, ZoomState

__all__ = ["VQAEnv", "VQATask", "vqa_rows"]

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
ANSWER_TYPES = ("choice", "exact", "numeric")


@dataclass(slots=True)
class VQATask(Task):
    image: np.ndarray | None = None
    question: str = ""
    options: tuple[str, ...] = ()
    answer: Any = None  # option index (choice), str (exact) or float (numeric)
    answer_type: str = "choice"


@dataclass(slots=True)
class _Row:
    path: Path
    question: str
    options: tuple[str, ...]
    answer: Any
    answer_type: str


def vqa_rows(root: str | Path, *, file: str = "data.jsonl", max_pixels: int = DEFAULT_MAX_PIXELS) -> list[_Row]:
    """Rows of a JSONL VQA dataset at ``root/file`` (image paths relative to ``root``)."""
    root = Path(root)
    path = root / file if root.is_dir() else root
    if root.is_file():
        root = root.parent
    if not path.is_file():
        raise DatasetError(f"VQA dataset file {str(path)!r} does not exist")

    def parse(item: tuple[int, Any]) -> _Row:
        _, d = item
        if isinstance(d, RowError):
            raise d
        if not isinstance(d, dict) or not isinstance(d.get("question"), str) or "answer" not in d:
            raise RowError("row is missing 'question' or 'answer'")
        img = resolve_in_root(root, d.get("image"))
        probe_image(img, max_pixels)
        options = d.get("options") or ()
        if not isinstance(options, (list, tuple)) or not all(isinstance(o, str) for o in options):
            raise RowError("'options' must be a list of strings")
        atype = d.get("answer_type") or ("choice" if options else "numeric" if isinstance(d["answer"], (int, float)) else "exact")
        if atype not in ANSWER_TYPES:
            raise RowError(f"answer_type {atype!r} is not one of {ANSWER_TYPES}")
        answer = d["answer"]
        if atype == "choice":
            if not options:
                raise RowError("a choice row needs 'options'")
            if isinstance(answer, int) and 0 <= answer < len(options):
                pass
            elif isinstance(answer, str) and answer in options:
                answer = options.index(answer)
            elif isinstance(answer, str) and len(answer.strip()) == 1 and LETTERS.find(answer.strip().upper()) in range(len(options)):
                answer = LETTERS.find(answer.strip().upper())
            else:
                raise RowError("choice answer must be an option index, letter or option text")
        elif atype == "numeric":
            try:
                answer = float(answer)
            except (TypeError, ValueError):
                raise RowError("numeric answer is not a number") from None
        else:
            answer = str(answer)
        return _Row(img, d["question"], tuple(options), answer, atype)

    rows, _ = load_rows(str(path), read_jsonl(path), parse)
    return rows


class VQAEnv(MMEnv):
    """Single image, one question; the agent may zoom (bbox) before it answers.

    Args:
        dataset: a JSONL dataset folder (``data.jsonl`` inside) or file; without it, procedural scenes.
        image_size: side of procedural scenes (px).
        answer_types: which answer kinds procedural questions use.
    """

    description = "Visual question answering on procedural shape scenes (choice, exact, numeric answers)."

    def __init__(
        self,
        *,
        dataset: str | None = None,
        image_size: int = 224,
        answer_types: tuple[str, ...] = ANSWER_TYPES,
        max_turns: int = 2,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        rubric: str = "accuracy",
        **kwargs: Any,
    ):
        if not answer_types or set(answer_types) - set(ANSWER_TYPES):
            raise ValueError(f"answer_types must be a non-empty subset of {ANSWER_TYPES}, got {answer_types}")
        self.image_size = int(image_size)
        self.answer_types = tuple(answer_types)
        self.max_pixels = int(max_pixels)
        self.rows = vqa_rows(dataset, max_pixels=max_pixels) if dataset else None
        super().__init__(max_turns=max_turns, rubric=rubric, **kwargs)

    def num_tasks(self) -> int | None:
        return len(self.rows) if self.rows is not None else None

    def make_tools(self) -> list:
        return [BBoxZoomTool("deepeyes", max_side=self.image_size)]

    def tool_state(self, task: VQATask) -> ZoomState:
        return ZoomState(image=task.image)

    def sample_task(self, rng: np.random.Generator, index: int | None) -> VQATask:
        if self.rows is not None:
            i = int(rng.integers(len(self.rows))) if index is None else index
            row = self.rows[i]
            try:
                img = load_rgb(row.path, self.max_pixels)
            except RowError:
                img = np.zeros((32, 32, 3), np.uint8)
            return self._task(f"vqa-{row.path.stem}-{i}", img, row.question, row.options, row.answer, row.answer_type)
        if index is not None:
            rng = np.random.default_rng([index, 0x7A0])
            tid = f"vqa-{index}"
        else:
            tid = f"vqa-r{int(rng.integers(2**31))}"
        return self._procedural(rng, tid)

    def _procedural(self, rng: np.random.Generator, tid: str) -> VQATask:
        s = self.image_size
        img = background(rng, s, s)
        n = int(rng.integers(3, 7))
        objs = []
        for _ in range(n):
            for _try in range(30):
                r = float(rng.choice([s * 0.06, s * 0.11]))
                cx, cy = float(rng.uniform(r + 2, s - r - 2)), float(rng.uniform(r + 2, s - r - 2))
                if all((cx - o[2]) ** 2 + (cy - o[3]) ** 2 > (r + o[4] + 4) ** 2 for o in objs):
                    break
            shape, color = SHAPES[int(rng.integers(3))], COLORS[int(rng.integers(len(COLORS)))]
            objs.append((shape, color, cx, cy, r))
            draw_shape(img, shape, cx, cy, r, PALETTE[color])
        atype = self.answer_types[int(rng.integers(len(self.answer_types)))]
        if atype == "numeric":
            color = objs[int(rng.integers(n))][1]
            return self._task(tid, img, f"How many {color} shapes are there?", (), float(sum(o[1] == color for o in objs)), "numeric")
        unique = [o for o in objs if sum(p[1] == o[1] for p in objs) == 1]
        if atype == "exact" and unique:
            o = unique[int(rng.integers(len(unique)))]
            return self._task(tid, img, f"What shape is the {o[1]} object? Answer with one word.", (), o[0], "exact")
        o = objs[int(rng.integers(n))]
        same = [p for p in objs if p[0] == o[0] and p[1] == o[1]]
        if len(same) == 1 and rng.random() < 0.5:
            truth = "left" if o[2] < s / 2 else "right"
            opts = ["left", "right"]
            q = f"Is the {o[1]} {o[0]} in the left or the right half of the image?"
        else:
            truth = o[1]
            size = "large" if o[4] > s * 0.08 else "small"
            # colours of every shape that fits the description are kept out of the distractors
            fits = {p[1] for p in objs if p[0] == o[0] and (p[4] > s * 0.08) == (o[4] > s * 0.08)}
            others = [c for c in COLORS if c not in fits]
            opts = [truth] + [others[i] for i in rng.permutation(len(others))[:3]]
            q = f"What colour is the {size} {o[0]}?" if len(fits) == 1 else f"Which of these colours does a {size} {o[0]} have?"
        order = rng.permutation(len(opts))
        options = tuple(opts[i] for i in order)
        return self._task(tid, img, q, options, int(np.where(order == 0)[0][0]), "choice")

    def _task(self, tid: str, img: np.ndarray, question: str, options: tuple[str, ...], answer: Any, atype: str) -> VQATask:
        if atype == "choice":
            opts = " ".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
            prompt = f"<image>\n{question}\nOptions: {opts}\nReply <answer>letter</answer>."
        elif atype == "numeric":
            prompt = f"<image>\n{question}\nReply <answer>number</answer>."
        else:
            prompt = f"<image>\n{question}\nReply <answer>word</answer>."
        return VQATask(task_id=tid, prompt=prompt, images=(img,), image=img, question=question, options=options, answer=answer, answer_type=atype)

    def verify(self, task: VQATask, answer: str) -> Verdict:
        if task.answer_type == "choice":
            return Verdict(choice_match(answer, task.options, task.answer))
        if task.answer_type == "numeric":
            return Verdict(numeric_match(answer, task.answer, abs_tol=1e-6))
        return Verdict(exact_match(answer, task.answer))

    def oracle_action(self) -> str:
        t: VQATask = self.task
        if t.answer_type == "choice":
            ans = LETTERS[t.answer]
        elif t.answer_type == "numeric":
            ans = f"{t.answer:g}"
        else:
            ans = str(t.answer)
        return self.parser.format_answer(ans)
