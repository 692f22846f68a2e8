"""Procedural drawing on OpenCV: palettes, clutter, shapes and zoom-only markers."""

from __future__ import annotations

import math

import cv2
import numpy as np

__all__ = ["PALETTE", "GLYPHS", "STRIPES", "draw_stripes", "draw_shape", "draw_glyph", "background", "add_clutter", "draw_marker", "glyph_ink_scale"]

# Named colours (RGB). None is near-white: white is reserved for markers.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 190),
    "orange": (240, 130, 30),
    "cyan": (40, 190, 200),
    "brown": (130, 80, 40),
}

GLYPHS = ("circle", "triangle", "square", "cross", "diamond", "bar")
# Stripe patterns: 5 periods across a marker's tile, half dark, so every pattern has the
# same ink and, once the period is below a pixel, the same mean colour. A small ViT tells
# their orientation apart far more easily than small glyph shapes.
STRIPES = ("horizontal", "vertical", "rising", "falling")


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A dark, textured, low-contrast background (gradient + coarse noise)."""
    base = rng.integers(40, 90, size=3).astype(np.float32)
    tint = rng.integers(-25, 25, size=3).astype(np.float32)
    yy = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    img = base + tint * yy
    img = np.broadcast_to(img, (h, w, 3)).copy()
    noise = rng.normal(0, 10, size=(max(2, h // 16), max(2, w // 16), 3)).astype(np.float32)
    img += cv2.resize(noise, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(img, 0, 255).astype(np.uint8)


def draw_shape(img: np.ndarray, shape: str, cx: float, cy: float, r: float, color: tuple[int, int, int], thickness: int = -1) -> None:
    """Draw ``circle``/``square``/``triangle``/``cross``/``diamond``/``bar`` of radius ``r`` at (cx, cy)."""
    c = (int(round(cx)), int(round(cy)))
    ri = max(1, int(round(r)))
    col = tuple(int(v) for v in color)
    if shape == "circle":
        cv2.circle(img, c, ri, col, thickness, cv2.LINE_AA)
    elif shape == "square":
        cv2.rectangle(img, (c[0] - ri, c[1] - ri), (c[0] + ri, c[1] + ri), col, thickness, cv2.LINE_AA)
    elif shape in ("triangle", "diamond"):
        if shape == "triangle":
            pts = [(cx, cy - r), (cx + r * math.sqrt(3) / 2, cy + r / 2), (cx - r * math.sqrt(3) / 2, cy + r / 2)]
        else:
            pts = [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
        arr = np.array([[int(round(x)), int(round(y))] for x, y in pts], np.int32)
        if thickness < 0:
            cv2.fillPoly(img, [arr], col, cv2.LINE_AA)
        else:
            cv2.polylines(img, [arr], True, col, thickness, cv2.LINE_AA)
    elif shape == "cross":
        t = max(1, int(round(r * 0.45)))
        cv2.rectangle(img, (c[0] - ri, c[1] - t), (c[0] + ri, c[1] + t), col, -1)
        cv2.rectangle(img, (c[0] - t, c[1] - ri), (c[0] + t, c[1] + ri), col, -1)
    elif shape == "bar":
        t = max(1, int(round(r * 0.5)))
        cv2.rectangle(img, (c[0] - ri, c[1] - t), (c[0] + ri, c[1] + t), col, -1)
    else:
        raise ValueError(f"unknown shape {shape!r}")


_INK_CACHE: dict[str, float] = {}


def glyph_ink_scale(glyph: str) -> float:
    """Radius factor that gives every glyph the same ink area as a circle of radius 1.

    With equal ink, a glyph downsampled below ~3 px has the same mean intensity whatever
    its shape, so it cannot be read from the first view.
    """
    if glyph not in _INK_CACHE:
        canvas = np.zeros((200, 200, 3), np.uint8)
        draw_shape(canvas, glyph, 100, 100, 60, (255, 255, 255))
        ink = float((canvas[..., 0] > 127).mean())
        ref = math.pi * 60 * 60 / (200 * 200)
        _INK_CACHE[glyph] = math.sqrt(ref / max(ink, 1e-6))
    return _INK_CACHE[glyph]


def draw_glyph(img: np.ndarray, glyph: str, cx: float, cy: float, r: float, color: tuple[int, int, int]) -> None:
    draw_shape(img, glyph, cx, cy, r * glyph_ink_scale(glyph), color)


def draw_stripes(img: np.ndarray, pattern: str, x1: int, y1: int, x2: int, y2: int, *,
                 dark: tuple[int, int, int] = (20, 20, 20), light: tuple[int, int, int] = (200, 200, 200)) -> None:
    """Fill ``img[y1:y2, x1:x2]`` with a ``STRIPES`` pattern (5 periods across the tile)."""
    if pattern not in STRIPES:
        raise ValueError(f"unknown stripe pattern {pattern!r}; known: {', '.join(STRIPES)}")
    h, w = img.shape[:2]
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
    if x2 <= x1 or y2 <= y1:
        return
    n = max(1, x2 - x1)
    yy, xx = np.mgrid[0:y2 - y1, 0:x2 - x1].astype(np.float32)
    u = {"horizontal": yy, "vertical": xx, "rising": xx + (y2 - y1 - yy), "falling": xx + yy}[pattern]
    period = n / 5.0 * (1.0 if pattern in ("horizontal", "vertical") else math.sqrt(2.0))
    is_dark = ((u / period) % 1.0) < 0.5
    img[y1:y2, x1:x2] = np.where(is_dark[..., None], np.array(dark, np.uint8), np.array(light, np.uint8))


def add_clutter(img: np.ndarray, rng: np.random.Generator, n: int, size_range: tuple[float, float], avoid: list[tuple[float, float, float, float]] = ()) -> None:
    """Random palette shapes and lines (never white) that stay clear of the ``avoid`` boxes."""
    h, w = img.shape[:2]
    names = list(PALETTE)
    kinds = ("circle", "square", "triangle", "diamond", "line")
    for _ in range(n):
        r = float(rng.uniform(*size_range))
        cx, cy = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        if any(x1 - r <= cx <= x2 + r and y1 - r <= cy <= y2 + r for x1, y1, x2, y2 in avoid):
            continue
        col = np.array(PALETTE[names[int(rng.integers(len(names)))]], np.float32)
        col = tuple(int(v) for v in np.clip(col * rng.uniform(0.6, 1.0), 0, 255))
        kind = kinds[int(rng.integers(len(kinds)))]
        if kind == "line":
            a = float(rng.uniform(0, math.pi))
            p1 = (int(cx - r * math.cos(a)), int(cy - r * math.sin(a)))
            p2 = (int(cx + r * math.cos(a)), int(cy + r * math.sin(a)))
            cv2.line(img, p1, p2, col, max(1, int(r / 8)), cv2.LINE_AA)
        else:
            draw_shape(img, kind, cx, cy, r, col, -1 if rng.random() < 0.7 else max(1, int(r / 6)))


def draw_marker(img: np.ndarray, cx: float, cy: float, side: float, *, glyph: str | None = None, color: tuple[int, int, int] | None = None) -> tuple[float, float, float, float]:
    """A zoom target: a white frame (visible from afar) around a light tile holding either a
    dark ink-equalised ``glyph`` (a ``GLYPHS`` shape, or a ``STRIPES`` pattern that fills the
    tile) or a ``color`` swatch. Returns its box ``(x1, y1, x2, y2)``."""
    half = side / 2
    x1, y1, x2, y2 = cx - half, cy - half, cx + half, cy + half
    p1 = (int(round(x1)), int(round(y1)))
    p2 = (int(round(x2)), int(round(y2)))
    cv2.rectangle(img, p1, p2, (250, 250, 250), -1)
    frame = max(2, int(round(side * 0.12)))
    inner1 = (p1[0] + frame, p1[1] + frame)
    inner2 = (p2[0] - frame, p2[1] - frame)
    cv2.rectangle(img, inner1, inner2, (200, 200, 200), -1)
    r = (side / 2 - frame) * 0.62
    if glyph in STRIPES:
        draw_stripes(img, glyph, inner1[0], inner1[1], inner2[0], inner2[1])
    elif glyph is not None:
        draw_glyph(img, glyph, cx, cy, r, (20, 20, 20))
    if color is not None:
        cv2.rectangle(img, (int(cx - r), int(cy - r)), (int(cx + r), int(cy + r)), color, -1)
    return (x1, y1, x2, y2)
