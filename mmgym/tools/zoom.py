"""Zoom / crop tools on OpenCV.

Two call shapes:

* ``zoom(bbox=[x1, y1, x2, y2])`` — absolute pixels of the original image (DeepEyes,
  Chain-of-Focus). Presets: ``deepeyes`` crops the clamped box, growing a side under
  28 px to 28 about its centre; ``chain_of_focus`` enlarges the box x1.5 about its
  centre, upsamples the crop x2 and to at least 112x112 px.
* ``zoom(region=k)`` — cell ``k`` (1-based, row-major) of a G x G grid whose labels are
  drawn on the first view. Small models learn this far faster than coordinates.

Either way the result is a new image in the observation, resized so its longer side is
at most ``max_side``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np

from mmgym.core import ToolResult

LABEL_CORNER = 0.4  # fraction of a cell's width/height taken by its label in the top-left corner

__all__ = ["LABEL_CORNER", "ZoomState", "BBoxZoomTool", "RegionZoomTool", "resize_max_side", "region_box", "draw_grid", "grid_code_color"]

MIN_SIDE = 28  # DeepEyes / Qwen2.5-VL minimum patch-merge size
MAX_ASPECT = 100.0


@dataclass(slots=True)
class ZoomState:
    """What zoom tools read: the full-resolution image and the boxes cropped so far."""

    image: np.ndarray
    crops: list[tuple[int, int, int, int]] = field(default_factory=list)


def resize_max_side(img: np.ndarray, max_side: int, *, min_side: int = 1) -> np.ndarray:
    """Resize so the longer side is ``max_side`` (down with INTER_AREA, up with INTER_CUBIC)."""
    h, w = img.shape[:2]
    scale = max_side / max(h, w)
    if scale == 1.0:
        return img
    nh, nw = max(min_side, round(h * scale)), max(min_side, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return cv2.resize(img, (nw, nh), interpolation=interp)


def _grow(lo: float, hi: float, size: float, limit: int) -> tuple[float, float]:
    """Grow [lo, hi] about its centre to ``size``, then shift it back inside [0, limit]."""
    if hi - lo >= size:
        return lo, hi
    c = (lo + hi) / 2
    lo, hi = c - size / 2, c + size / 2
    if lo < 0:
        lo, hi = 0.0, float(size)
    if hi > limit:
        lo, hi = max(0.0, limit - size), float(limit)
    return lo, hi


class BBoxZoomTool:
    """``zoom(bbox=[x1, y1, x2, y2])`` in absolute pixels of the original image."""

    name = "zoom"
    description = (
        "Zoom into a region of the original image. bbox is [x1, y1, x2, y2] in pixels of the "
        "original image (its size is given in the task). Returns the enlarged region."
    )

    def __init__(self, preset: Literal["deepeyes", "chain_of_focus"] = "deepeyes", *, max_side: int = 224):
        if preset not in ("deepeyes", "chain_of_focus"):
            raise ValueError(f"unknown zoom preset {preset!r}; known: deepeyes, chain_of_focus")
        self.preset = preset
        self.max_side = int(max_side)
        self.parameters: dict[str, Any] = {
            "type": "object",
            "properties": {
                "bbox": {
                    "type": "array",
                    "items": {"type": "number"},
                    "minItems": 4,
                    "maxItems": 4,
                    "description": "[x1, y1, x2, y2] in pixels of the original image",
                },
                "label": {"type": "string", "maxLength": 200},
            },
            "required": ["bbox"],
            "additionalProperties": False,
        }

    def box_for(self, bbox: list[float], width: int, height: int) -> tuple[int, int, int, int] | str:
        """The integer crop box the preset takes for ``bbox``, or an error message."""
        x1, y1, x2, y2 = (float(v) for v in bbox)
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            return "bbox values must be finite numbers"
        if x2 <= x1 or y2 <= y1:
            return f"bbox {bbox} is empty or reversed: need x1 < x2 and y1 < y2"
        if self.preset == "chain_of_focus":  # enlarge x1.5 about the centre
            cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * 0.75, (y2 - y1) * 0.75
            x1, y1, x2, y2 = cx - hw, cy - hh, cx + hw, cy + hh
        cx1, cy1 = max(0.0, x1), max(0.0, y1)
        cx2, cy2 = min(float(width), x2), min(float(height), y2)
        if cx2 <= cx1 or cy2 <= cy1:
            return f"bbox {bbox} lies outside the image ({width}x{height} pixels)"
        cx1, cx2 = _grow(cx1, cx2, min(MIN_SIDE, width), width)
        cy1, cy2 = _grow(cy1, cy2, min(MIN_SIDE, height), height)
        w, h = cx2 - cx1, cy2 - cy1
        if max(w, h) / min(w, h) > MAX_ASPECT:
            return f"bbox {bbox} is too thin: aspect ratio must be at most {MAX_ASPECT:g}"
        ix1, iy1 = int(math.floor(cx1)), int(math.floor(cy1))
        ix2, iy2 = max(ix1 + 1, int(math.ceil(cx2))), max(iy1 + 1, int(math.ceil(cy2)))
        return ix1, iy1, min(ix2, width), min(iy2, height)

    def __call__(self, state: ZoomState, bbox: list[float], label: str = "") -> ToolResult:
        h, w = state.image.shape[:2]
        box = self.box_for(bbox, w, h)
        if isinstance(box, str):
            return ToolResult.fail(box)
        x1, y1, x2, y2 = box
        crop = state.image[y1:y2, x1:x2]
        if self.preset == "chain_of_focus":  # upsample x2, at least 112x112 px
            ch, cw = crop.shape[:2]
            scale = max(2.0, math.sqrt(112 * 112 / (ch * cw)))
            target = min(self.max_side, max(ch, cw) * scale)
        else:
            target = min(self.max_side, max(crop.shape[:2]))
            target = max(target, min(self.max_side, MIN_SIDE))
        out = resize_max_side(crop, int(round(target)))
        state.crops.append(box)
        return ToolResult(
            text=f"Zoomed into [{x1}, {y1}, {x2}, {y2}]: <image>",
            images=(np.ascontiguousarray(out),),
        )


def region_box(k: int, grid: int, width: int, height: int, margin: float = 0.0) -> tuple[int, int, int, int]:
    """Pixel box of cell ``k`` (1-based, row-major) of a ``grid x grid`` layout, grown by ``margin`` x cell."""
    r, c = divmod(k - 1, grid)
    cw, ch = width / grid, height / grid
    x1, y1 = c * cw - margin * cw, r * ch - margin * ch
    x2, y2 = (c + 1) * cw + margin * cw, (r + 1) * ch + margin * ch
    return (
        max(0, int(math.floor(x1))),
        max(0, int(math.floor(y1))),
        min(width, int(math.ceil(x2))),
        min(height, int(math.ceil(y2))),
    )


CODE_ALPHA = 0.35


def grid_code_color(row: int, col: int, grid: int) -> tuple[int, int, int]:
    """The colour code of cell (row, col): red grows with the column, green with the row."""
    step = 190 // max(1, grid - 1)
    return (30 + step * col, 30 + step * row, 140)


def draw_grid(view: np.ndarray, grid: int, *, coded: bool = False, code_alpha: float = CODE_ALPHA) -> np.ndarray:
    """Return a copy of ``view`` with grid lines and 1-based cell labels drawn on it.

    ``coded`` instead tints each cell with its colour code (``grid_code_color``: red for the
    column, green for the row; ``code_alpha`` of the pixel) and draws no lines or digits, so
    every image token carries its cell's identity and nothing bright competes with the
    targets: a small vision tower that cannot read digits can still name the cell it looks at
    (a Set-of-Mark-style visual prompt). With lines and digits as well, the embedded tiny
    model did not learn to localise in 600 supervised steps; with tints alone it began to.
    The code must be readable from a cell's own pixels: at ``code_alpha`` 0.35 a median of
    the pixels around a marker names its cell 59 % of the time without a global colour
    reference (the background's base colour varies per image), at 0.6 100 %.
    """
    if not 0.0 < code_alpha <= 1.0:
        raise ValueError(f"code_alpha must lie in (0, 1], got {code_alpha}")
    out = view.copy()
    h, w = out.shape[:2]
    if coded:
        for r in range(grid):
            for c in range(grid):
                ys = slice(round(r * h / grid), round((r + 1) * h / grid))
                xs = slice(round(c * w / grid), round((c + 1) * w / grid))
                tint = np.array(grid_code_color(r, c, grid), np.float32)
                out[ys, xs] = np.clip(out[ys, xs].astype(np.float32) * (1 - code_alpha) + tint * code_alpha, 0, 255).astype(np.uint8)
        return out
    for i in range(1, grid):
        x, y = round(i * w / grid), round(i * h / grid)
        cv2.line(out, (x, 0), (x, h - 1), (255, 255, 255), 1)
        cv2.line(out, (0, y), (w - 1, y), (255, 255, 255), 1)
    # small labels in each cell's top-left corner (LABEL_CORNER of the cell is reserved for them)
    scale = max(0.25, min(w, h) / grid / 90)
    for k in range(1, grid * grid + 1):
        r, c = divmod(k - 1, grid)
        org = (round(c * w / grid) + 1, round(r * h / grid) + max(7, int(22 * scale)))
        cv2.putText(out, str(k), org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 0), 1, cv2.LINE_AA)
    return out


class RegionZoomTool:
    """``zoom(region=k)`` over a ``grid x grid`` layout of the original image."""

    name = "zoom"

    def __init__(self, grid: int = 4, *, max_side: int = 224, margin: float = 0.05):
        if grid < 1:
            raise ValueError(f"zoom grid must be >= 1, got {grid}")
        self.grid = int(grid)
        self.max_side = int(max_side)
        self.margin = float(margin)
        self.description = (
            f"Zoom into one cell of the {grid}x{grid} grid drawn on the image. "
            f"region is the cell number 1..{grid * grid}, row by row from the top left."
        )
        self.parameters: dict[str, Any] = {
            "type": "object",
            "properties": {"region": {"type": "integer", "minimum": 1, "maximum": grid * grid}},
            "required": ["region"],
            "additionalProperties": False,
        }

    def box_for(self, region: int, width: int, height: int) -> tuple[int, int, int, int]:
        return region_box(region, self.grid, width, height, self.margin)

    def __call__(self, state: ZoomState, region: int) -> ToolResult:
        h, w = state.image.shape[:2]
        x1, y1, x2, y2 = self.box_for(int(region), w, h)
        out = resize_max_side(state.image[y1:y2, x1:x2], self.max_side)
        state.crops.append((x1, y1, x2, y2))
        return ToolResult(text=f"Zoomed into region {int(region)}: <image>", images=(np.ascontiguousarray(out),))
