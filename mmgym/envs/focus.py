"""``mmgym/ChainOfFocus-v0``: V*-style visual search where the answer is only readable
after zooming (V*, DeepEyes, Chain-of-Focus).

The agent first sees the large canvas downsampled to ``view_size`` px. Targets are small
white-framed markers: findable from afar, but the symbol inside each (an ink-equalised
glyph, or with ``symbols="stripes"`` a stripe pattern) shrinks below ~3 px (stripes: below
a one-pixel period) in the first view, where every symbol has the same mean intensity.
The agent must zoom (``zoom(bbox=...)`` or ``zoom(region=k)``) to read it.

Questions (four options each): *attribute* — which symbol is inside the marker; and
*relative* — where one marker lies relative to another (left/right/above/below), which
needs both symbols read. Ground-truth boxes are kept for a crop-IoU diagnostic and for the
optional turn-level ``zoom`` reward (a verified reward for a zoom that reaches a target).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mmgym.core import ToolCall, ToolResult
from mmgym.envs.base import MMEnv, Task, Verdict
from mmgym.envs.datasets import DEFAULT_MAX_PIXELS, RowError, load_rgb, load_rows, probe_image, resolve_in_root
from mmgym.envs.scenes import GLYPHS, PALETTE, STRIPES, add_clutter, background, draw_marker
from mmgym.rewards import LETTERS, bbox_iou, choice_match
from mmgym.tools import BBoxZoomTool, RegionZoomTool, ZoomState, draw_grid, resize_max_side
from mmgym.tools.zoom import LABEL_CORNER

__all__ = ["ChainOfFocusEnv", "FocusTask", "vstar_rows"]

DIRECTIONS = ("left", "right", "above", "below")


@dataclass(slots=True)
class FocusTask(Task):
    image: np.ndarray | None = None  # full-resolution canvas
    options: tuple[str, ...] = ()
    correct: int = 0
    boxes: tuple[tuple[float, float, float, float], ...] = ()  # targets, x1 y1 x2 y2
    qtype: str = "attribute"
    question: str = ""
    source_path: str = ""


@dataclass(slots=True)
class _VStarRow:
    path: Path
    qtype: str
    question: str
    options: tuple[str, ...]
    boxes: tuple[tuple[float, float, float, float], ...]


def vstar_rows(root: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[_VStarRow]:
    """Rows of a V* benchmark folder: ``direct_attributes/`` and ``relative_position/``, each
    image beside a ``.json`` (``question``, ``options`` with the correct one first,
    ``target_object``, ``bbox`` as ``[x, y, w, h]`` or a list of them)."""
    root = Path(root)
    if not root.is_dir():
        from mmgym.envs.datasets import DatasetError

        raise DatasetError(f"V* dataset folder {str(root)!r} does not exist")
    metas = sorted(p for sub in ("direct_attributes", "relative_position") for p in (root / sub).glob("*.json"))

    def parse(meta: Path) -> _VStarRow:
        try:
            d = json.loads(meta.read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:
            raise RowError(f"{meta.name} is not JSON ({type(e).__name__})") from None
        if not isinstance(d, dict):
            raise RowError(f"{meta.name}: missing fields")
        q, opts, bb = d.get("question"), d.get("options"), d.get("bbox")
        if not isinstance(q, str) or not isinstance(opts, list) or len(opts) < 2 or not all(isinstance(o, str) for o in opts):
            raise RowError(f"{meta.name}: missing question/options")
        if bb and isinstance(bb[0], (int, float)):
            bb = [bb]
        try:
            boxes = tuple((float(x), float(y), float(x) + float(w), float(y) + float(h)) for x, y, w, h in (bb or []))
        except (TypeError, ValueError):
            raise RowError(f"{meta.name}: bad bbox") from None
        image = None
        for ext in (".jpg", ".jpeg", ".png", ".JPG", ".PNG", ".webp"):
            cand = meta.with_suffix(ext)
            if cand.exists():
                image = cand
                break
        if image is None:
            raise RowError(f"{meta.stem}: image does not exist")
        resolve_in_root(root, str(image.relative_to(root)))
        probe_image(image, max_pixels)
        qtype = "attribute" if meta.parent.name == "direct_attributes" else "relative"
        return _VStarRow(image, qtype, q, tuple(opts), boxes)

    rows, _ = load_rows(str(root), metas, parse)
    return rows


class ChainOfFocusEnv(MMEnv):
    """Visual search with zoom. See the module docstring.

    Args:
        dataset: a V* benchmark folder; without it, the procedural generator.
        zoom: ``"bbox"`` (``zoom(bbox=[x1, y1, x2, y2])`` in original pixels) or ``"region"``
            (``zoom(region=k)`` on a ``grid x grid`` layout drawn on the first view).
        zoom_preset: ``"deepeyes"`` or ``"chain_of_focus"`` crop geometry (bbox mode).
        view_size: longer side of the first view (px); zoom_size: of zoom results.
        canvas: (min, max) side of procedural canvases in px.
        marker_frac: marker side as a fraction of the canvas' longer side.
        question_types: which question kinds to draw.
        zoom_reward: weight of the turn-level ``zoom`` term: paid once per target for the
            first crop that contains that target's centre (0 disables it).
        answer_format: what the prompt asks for, ``"letter"`` (V*) or the option ``"text"``;
            either is accepted when verifying.
        symbols: what procedural markers hold: ``"glyphs"`` (six ink-equalised shapes) or
            ``"stripes"`` (four stripe orientations, equal ink; far easier for a small
            vision tower to read once zoomed, and just as unreadable in the first view).
        grid_code: region mode: colour-code each grid label (``draw_grid(coded=True)``) so a
            small model can tell the cells apart without reading digits.
        grid_code_alpha: how strongly the code tints each cell (the tint's share of a pixel).
    """

    description = "V*-style visual search: the answer is readable only after zooming into a large image."

    def __init__(
        self,
        *,
        dataset: str | None = None,
        zoom: Literal["bbox", "region"] = "bbox",
        zoom_preset: Literal["deepeyes", "chain_of_focus"] = "deepeyes",
        grid: int = 4,
        view_size: int = 224,
        zoom_size: int = 224,
        canvas: tuple[int, int] = (1024, 2048),
        marker_frac: float = 0.013,
        clutter: int = 120,
        question_types: tuple[str, ...] = ("attribute", "relative"),
        zoom_reward: float = 0.0,
        answer_format: Literal["letter", "text"] = "letter",
        symbols: Literal["glyphs", "stripes"] = "glyphs",
        grid_code: bool = False,
        grid_code_alpha: float = 0.35,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_turns: int = 4,
        rubric: str = "chain_of_focus",
        **kwargs: Any,
    ):
        if answer_format not in ("letter", "text"):
            raise ValueError(f"answer_format must be 'letter' or 'text', got {answer_format!r}")
        self.answer_format = answer_format
        if symbols not in ("glyphs", "stripes"):
            raise ValueError(f"symbols must be 'glyphs' or 'stripes', got {symbols!r}")
        self.symbols = symbols
        self.grid_code = bool(grid_code)
        if not 0.0 < grid_code_alpha <= 1.0:
            raise ValueError(f"grid_code_alpha must lie in (0, 1], got {grid_code_alpha}")
        self.grid_code_alpha = float(grid_code_alpha)
        if zoom not in ("bbox", "region"):
            raise ValueError(f"zoom must be 'bbox' or 'region', got {zoom!r}")
        bad = set(question_types) - {"attribute", "relative"}
        if bad or not question_types:
            raise ValueError(f"question_types must be a non-empty subset of ('attribute', 'relative'), got {question_types}")
        if not (16 <= canvas[0] <= canvas[1]):
            raise ValueError(f"canvas must be (min, max) with 16 <= min <= max, got {canvas}")
        self.zoom_mode = zoom
        self.zoom_preset = zoom_preset
        self.grid = int(grid)
        self.view_size = int(view_size)
        self.zoom_size = int(zoom_size)
        self.canvas = (int(canvas[0]), int(canvas[1]))
        self.marker_frac = float(marker_frac)
        self.clutter = int(clutter)
        self.question_types = tuple(question_types)
        self.zoom_reward = float(zoom_reward)
        self.max_pixels = int(max_pixels)
        self.rows = vstar_rows(dataset, max_pixels) if dataset else None
        super().__init__(max_turns=max_turns, rubric=rubric, **kwargs)

    # ---------------------------------------------------------------- tasks
    def num_tasks(self) -> int | None:
        return len(self.rows) if self.rows is not None else None

    def sample_task(self, rng: np.random.Generator, index: int | None) -> FocusTask:
        if self.rows is not None:
            i = int(rng.integers(len(self.rows))) if index is None else index
            return self._vstar_task(rng, i)
        if index is not None:  # evaluation task i: its own fixed stream, independent of the env seed
            return self._procedural_task(np.random.default_rng([index, 0x5EED]), f"focus-{index}")
        return self._procedural_task(rng, f"focus-r{int(rng.integers(2**31))}")

    def _place(self, rng: np.random.Generator, w: int, h: int, side: float, taken: list[tuple[float, float, float, float]]) -> tuple[float, float]:
        """A marker centre fully inside one grid cell (so a region zoom can show it whole)."""
        g = self.grid
        cw, ch = w / g, h / g
        pad = side * 0.6
        for _ in range(200):
            r, c = int(rng.integers(g)), int(rng.integers(g))
            lo_x, hi_x = c * cw + pad, (c + 1) * cw - pad
            lo_y, hi_y = r * ch + pad, (r + 1) * ch - pad
            if self.zoom_mode == "region" and rng.random() < 0.5:  # keep clear of the cell's label
                lo_x = max(lo_x, c * cw + LABEL_CORNER * cw)
            elif self.zoom_mode == "region":
                lo_y = max(lo_y, r * ch + LABEL_CORNER * ch)
            if hi_x <= lo_x or hi_y <= lo_y:
                lo_x, hi_x, lo_y, hi_y = pad, w - pad, pad, h - pad
            cx, cy = float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))
            if all(not (x1 - 2 * side < cx < x2 + 2 * side and y1 - 2 * side < cy < y2 + 2 * side) for x1, y1, x2, y2 in taken):
                return cx, cy
        return float(rng.uniform(pad, w - pad)), float(rng.uniform(pad, h - pad))

    def _procedural_task(self, rng: np.random.Generator, task_id: str) -> FocusTask:
        w, h = (int(v) for v in rng.integers(self.canvas[0], self.canvas[1] + 1, size=2))
        side = max(8.0, self.marker_frac * max(w, h) * float(rng.uniform(0.9, 1.1)))
        img = background(rng, h, w)
        qtype = self.question_types[int(rng.integers(len(self.question_types)))]
        n_targets = 1 if qtype == "attribute" else 2
        kinds = STRIPES if self.symbols == "stripes" else GLYPHS
        glyphs = [kinds[i] for i in rng.permutation(len(kinds))[:n_targets]]
        centres: list[tuple[float, float]] = []
        boxes: list[tuple[float, float, float, float]] = []
        for _ in range(n_targets):
            for _attempt in range(50):
                cx, cy = self._place(rng, w, h, side, boxes)
                if qtype == "attribute" or not centres:
                    break
                dx, dy = cx - centres[0][0], cy - centres[0][1]
                # one axis must clearly dominate so "left/right/above/below" is unambiguous
                if max(abs(dx), abs(dy)) > 2.5 * min(abs(dx), abs(dy)) and max(abs(dx), abs(dy)) > 3 * side:
                    break
            centres.append((cx, cy))
            boxes.append((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
        add_clutter(img, rng, self.clutter, (side * 0.3, side * 1.6), avoid=[(x1 - side, y1 - side, x2 + side, y2 + side) for x1, y1, x2, y2 in boxes])
        for (cx, cy), g in zip(centres, glyphs):
            draw_marker(img, cx, cy, side, glyph=g)
        if qtype == "attribute":
            distractors = [g for g in kinds if g != glyphs[0]]
            opts = [glyphs[0]] + [distractors[i] for i in rng.permutation(len(distractors))[:3]]
            what = "stripe pattern" if self.symbols == "stripes" else "symbol"
            question = f"Which {what} is inside the small white-framed marker?"
        else:
            dx, dy = centres[0][0] - centres[1][0], centres[0][1] - centres[1][1]
            truth = ("left" if dx < 0 else "right") if abs(dx) >= abs(dy) else ("above" if dy < 0 else "below")
            opts = [truth] + [d for d in DIRECTIONS if d != truth]
            noun = " stripes" if self.symbols == "stripes" else ""
            question = f"Where is the marker with the {glyphs[0]}{noun} relative to the marker with the {glyphs[1]}{noun}?"
        order = rng.permutation(len(opts))
        options = tuple(opts[i] for i in order)
        correct = int(np.where(order == 0)[0][0])
        return self._make_task(task_id, img, question, options, correct, tuple(boxes), qtype)

    def _vstar_task(self, rng: np.random.Generator, i: int) -> FocusTask:
        row = self.rows[i]
        try:
            img = load_rgb(row.path, self.max_pixels)
        except RowError:
            img = np.zeros((64, 64, 3), np.uint8)  # file changed since load: an unanswerable blank
        order = rng.permutation(len(row.options))
        options = tuple(row.options[j] for j in order)
        correct = int(np.where(order == 0)[0][0])
        return self._make_task(f"vstar-{row.path.stem}", img, row.question, options, correct, row.boxes, row.qtype, str(row.path))

    def _make_task(self, task_id: str, img: np.ndarray, question: str, options: tuple[str, ...], correct: int, boxes: tuple, qtype: str, source: str = "") -> FocusTask:
        h, w = img.shape[:2]
        view = resize_max_side(img, self.view_size)
        if self.zoom_mode == "region":
            view = draw_grid(view, self.grid, coded=self.grid_code, code_alpha=self.grid_code_alpha)
            how = f'zoom(region=k) on the {self.grid}x{self.grid} grid, k=1..{self.grid * self.grid}'
        else:
            how = f"zoom(bbox=[x1, y1, x2, y2]) in pixels of the {w}x{h} original"
        opt_text = " ".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
        reply = "<answer>letter</answer>" if self.answer_format == "letter" else "<answer>option</answer>"
        prompt = f"<image>\n{question}\nOptions: {opt_text}\nThe image is shown downscaled; {how}, then reply {reply}."
        return FocusTask(
            task_id=task_id, prompt=prompt, images=(view,), image=img, options=options, correct=correct,
            boxes=boxes, qtype=qtype, question=question, source_path=source,
        )

    # ---------------------------------------------------------------- tools & rewards
    def make_tools(self) -> list:
        if self.zoom_mode == "region":
            return [RegionZoomTool(self.grid, max_side=self.zoom_size)]
        return [BBoxZoomTool(self.zoom_preset, max_side=self.zoom_size)]

    def tool_state(self, task: FocusTask) -> ZoomState:
        self._seen: set[int] = set()  # targets some zoom has shown this episode
        return ZoomState(image=task.image)

    def _hits(self, box: tuple[int, int, int, int]) -> list[int]:
        x1, y1, x2, y2 = box
        return [k for k, (a, b, c, d) in enumerate(self.task.boxes) if x1 <= (a + c) / 2 <= x2 and y1 <= (b + d) / 2 <= y2]

    def turn_terms(self, calls: list[ToolCall], results: list[ToolResult]) -> dict[str, float]:
        ok = [r for r in results if r.error is None]
        if not ok or not self.task.boxes:
            return {}
        crops = self._state.crops[-len(ok):]
        best = max(bbox_iou(c, b) for c in crops for b in self.task.boxes)
        self._metrics["crop_iou"] = max(self._metrics.get("crop_iou", 0.0), best)
        newly = {k for c in crops for k in self._hits(c)} - self._seen
        self._seen |= newly
        self._metrics["zoom_hit"] = len(self._seen) / len(self.task.boxes)
        if self.zoom_reward <= 0:
            return {}
        return {"zoom": self.zoom_reward * len(newly) / len(self.task.boxes)}

    def verify(self, task: FocusTask, answer: str) -> Verdict:
        return Verdict(choice_match(answer, task.options, task.correct))

    # ---------------------------------------------------------------- scripted
    def oracle_box(self, k: int) -> list[int]:
        """A zoom box (bbox mode) around target ``k``: 2.5x the marker, in original pixels."""
        x1, y1, x2, y2 = self.task.boxes[k]
        cx, cy, s = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1) * 1.25
        h, w = self.task.image.shape[:2]
        return [max(0, int(cx - s)), max(0, int(cy - s)), min(w, int(math.ceil(cx + s))), min(h, int(math.ceil(cy + s)))]

    def oracle_region(self, k: int) -> int:
        x1, y1, x2, y2 = self.task.boxes[k]
        h, w = self.task.image.shape[:2]
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        c = min(self.grid - 1, int(cx / (w / self.grid)))
        r = min(self.grid - 1, int(cy / (h / self.grid)))
        return r * self.grid + c + 1

    def demonstration_action(self, rng: np.random.Generator, zoom_noise: float = 0.0) -> str:
        """An oracle reply whose zoom goes to a random place with probability ``zoom_noise``.

        Noisy demonstrations teach reading but not localisation (REFERENCES: the prototype's
        50 %-random-zoom demonstrations); after a zoom that missed, the answer is a guess.
        """
        wants_zoom = len(self._seen) < len(self.task.boxes) and self._turn < self.max_turns - 1
        if wants_zoom and rng.random() < zoom_noise:
            h, w = self.task.image.shape[:2]
            if self.zoom_mode == "region":
                args: dict[str, Any] = {"region": int(rng.integers(1, self.grid * self.grid + 1))}
            else:
                s = max(h, w) * float(rng.uniform(0.05, 0.25))
                x, y = float(rng.uniform(0, w - s)), float(rng.uniform(0, h - s))
                args = {"bbox": [int(x), int(y), int(x + s), int(y + s)]}
            return self.parser.format_call(ToolCall("zoom", args))
        if not wants_zoom and self._turn > 0 and not self._seen:
            return self._format_option(int(rng.integers(len(self.task.options))))
        return self.oracle_action()

    def oracle_zoom(self, k: int) -> ToolCall:
        """The oracle's zoom onto target ``k``: ``zoom(region=...)`` or ``zoom(bbox=...)``."""
        args = {"region": self.oracle_region(k)} if self.zoom_mode == "region" else {"bbox": self.oracle_box(k)}
        return ToolCall("zoom", args)

    def oracle_action(self) -> str:
        for k in range(len(self.task.boxes)):
            if k not in self._seen and self._turn < self.max_turns - 1:
                return self.parser.format_call(self.oracle_zoom(k))
        return self._format_option(self.task.correct)

    def gold_tool_calls(self) -> list[list[ToolCall]] | None:
        """The oracle's zooms on a fresh episode: one turn per target, as many as leave a
        turn for the answer (``max_turns - 1``; none with ``max_turns=1``); ``None`` for a task
        without target boxes."""
        if not self.task.boxes:
            return None
        return [[self.oracle_zoom(k)] for k in range(min(len(self.task.boxes), self.max_turns - 1))]

    def _format_option(self, i: int) -> str:
        return self.parser.format_answer(LETTERS[i] if self.answer_format == "letter" else self.task.options[i])
