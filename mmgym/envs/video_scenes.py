"""Procedural videos for ``mmgym/VideoFrames-v0``: moving sprites over a textured
background with short events that a sparse low-resolution overview cannot resolve.

Events (the ground truth of every question):

* **signs** — 2 or 3 coloured boards, each showing a letter (or, with
  ``symbols="stripes"``, one of four stripe patterns) for 2-5 s at its own time.
  A board is a visible colour blob in the overview, but its letter (~14 px tall at
  320 px) shrinks to ~4 px there: it can be read only after ``crop_video`` /
  ``get_frames`` / ``zoom_frame``.
* **collision** — two named sprites (e.g. a red circle and a blue square) approach,
  touch at a known time ``tc`` (with a short flash) and separate again.

A video is fully determined by its seed and the ``SceneConfig``; it is rendered once,
written as a real MP4 (PyAV) into the cache folder under a name keyed by both, and read
back through the decoder like any dataset video (LOVE-R1 / LongVT read real files).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from mmgym.envs.scenes import PALETTE, STRIPES, background, draw_shape, draw_stripes
from mmgym.envs.video_io import write_mp4

__all__ = ["SceneConfig", "Sign", "Sprite", "VideoSpec", "make_spec", "render_frame", "draw_sign", "ensure_video", "prune_cache", "default_cache_dir", "SIGN_LETTERS", "SIGN_SYMBOLS", "symbol_set"]

GEN_VERSION = 2
SALT = 0x71DE0
SIGN_LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"  # no I, O, Q: too easy to confuse at small sizes
SIGN_SYMBOLS = ("letters", "stripes")
SPRITE_SHAPES = ("circle", "square", "triangle", "diamond")
SIGN_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
# Letter styles vary per sign (font, offset inside the board), so a downsampled letter
# cannot be recognised by matching one known rendering.
SIGN_FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_TRIPLEX, cv2.FONT_HERSHEY_PLAIN)


def default_cache_dir() -> Path:
    """``$MMGYM_CACHE/videos`` if set, else ``~/.cache/mmgym/videos``."""
    root = os.environ.get("MMGYM_CACHE")
    return Path(root) / "videos" if root else Path.home() / ".cache" / "mmgym" / "videos"


@dataclass(slots=True, frozen=True)
class SceneConfig:
    """Size of generated videos: ``width x height`` px, ``fps``, duration range in whole seconds."""

    width: int = 320
    height: int = 240
    fps: int = 8
    duration: tuple[int, int] = (30, 75)
    sign_frac: float = 0.075  # board side / video width; the letter is 0.6 of the board
    symbols: str = "letters"  # what a board shows: a letter, or a STRIPES pattern (0.7 of the board)

    def __post_init__(self) -> None:
        if self.width < 64 or self.height < 48 or self.width % 2 or self.height % 2:
            raise ValueError(f"video size must be even and at least 64x48, got {self.width}x{self.height}")
        if not 1 <= self.fps <= 60:
            raise ValueError(f"video fps must be in 1..60, got {self.fps}")
        lo, hi = self.duration
        if not 20 <= lo <= hi <= 3600:
            raise ValueError(f"duration must be (min, max) seconds with 20 <= min <= max <= 3600, got {self.duration}")
        if not 0.02 <= self.sign_frac <= 0.3:
            raise ValueError(f"sign_frac must be in [0.02, 0.3], got {self.sign_frac}")
        if self.symbols not in SIGN_SYMBOLS:
            raise ValueError(f"sign symbols must be one of {SIGN_SYMBOLS}, got {self.symbols!r}")

    def key(self) -> str:
        raw = f"v{GEN_VERSION}-{self.width}x{self.height}-{self.fps}-{self.duration[0]}-{self.duration[1]}-{self.sign_frac:g}"
        if self.symbols != "letters":  # letter videos keep their earlier cache names
            raw += f"-{self.symbols}"
        return hashlib.blake2b(raw.encode(), digest_size=4).hexdigest()


@dataclass(slots=True, frozen=True)
class Sprite:
    """A shape moving in a straight line and bouncing off the frame edges."""

    shape: str
    colour: str
    radius: float
    x0: float
    y0: float
    vx: float
    vy: float

    def position(self, t: float, w: int, h: int) -> tuple[float, float]:
        return _bounce(self.x0 + self.vx * t, self.radius, w - self.radius), _bounce(self.y0 + self.vy * t, self.radius, h - self.radius)


@dataclass(slots=True, frozen=True)
class Sign:
    """A board of ``colour`` showing ``letter`` while ``start <= t < end`` (frame-aligned).
    ``letter`` is a capital letter, or a ``STRIPES`` pattern name for striped boards."""

    letter: str
    colour: str
    cx: float
    cy: float
    side: float
    start: float
    end: float
    font: int = cv2.FONT_HERSHEY_SIMPLEX
    dx: float = 0.0  # letter offset inside the board, as a fraction of its side
    dy: float = 0.0


@dataclass(slots=True, frozen=True)
class VideoSpec:
    """Everything needed to render a video and to ask questions about it."""

    seed: int
    config: SceneConfig
    duration: int
    sprites: tuple[Sprite, ...]
    signs: tuple[Sign, ...]
    pair: tuple[Sprite, Sprite]  # the colliding sprites (x0 is the meeting point)
    collision_time: float
    approach_speed: float  # px/s of each sprite towards the other
    max_gap: float

    @property
    def num_frames(self) -> int:
        return self.duration * self.config.fps

    def filename(self) -> str:
        return f"sprites-{self.config.key()}-{self.seed}.mp4"


def _bounce(x: float, lo: float, hi: float) -> float:
    """Reflect ``x`` into ``[lo, hi]`` (a triangle wave)."""
    span = hi - lo
    if span <= 0:
        return lo
    u = (x - lo) % (2 * span)
    return lo + (u if u <= span else 2 * span - u)


def _frame_aligned(t: float, fps: int) -> float:
    return round(t * fps) / fps


def symbol_set(cfg: SceneConfig) -> tuple[str, ...]:
    """What the boards of videos made with ``cfg`` can show."""
    return STRIPES if cfg.symbols == "stripes" else tuple(SIGN_LETTERS)


def _make_signs(rng: np.random.Generator, cfg: SceneConfig, duration: int) -> tuple[Sign, ...]:
    w, h = cfg.width, cfg.height
    k = int(rng.integers(2, 4))
    letters = rng.choice(list(symbol_set(cfg)), size=k, replace=False)
    colours = rng.choice(list(SIGN_COLOURS), size=k, replace=False)
    side = round(cfg.sign_frac * w)
    slot = (duration - 2.0) / k
    signs = []
    for j in range(k):
        d = float(rng.uniform(2.0, 5.0))
        t0 = 1.0 + j * slot + float(rng.uniform(0.0, max(0.0, slot - d - 1.0)))
        start, end = _frame_aligned(t0, cfg.fps), _frame_aligned(t0 + d, cfg.fps)
        # Upper band, clear of the timestamp label drawn in the top-left corner.
        cx = float(rng.uniform(0.25 * w, 0.9 * w))
        cy = float(rng.uniform(0.22 * h, 0.5 * h))
        font = SIGN_FONTS[int(rng.integers(len(SIGN_FONTS)))]
        dx, dy = (float(v) for v in rng.uniform(-0.12, 0.12, size=2))
        signs.append(Sign(str(letters[j]), str(colours[j]), cx, cy, float(side), start, end, font, dx, dy))
    return tuple(signs)


def make_spec(seed: int, cfg: SceneConfig) -> VideoSpec:
    """The video for ``seed``: sprites, signs and one collision, drawn from its own stream."""
    rng = np.random.default_rng([int(seed), SALT, GEN_VERSION])
    w, h = cfg.width, cfg.height
    duration = int(rng.integers(cfg.duration[0], cfg.duration[1] + 1))
    names = list(PALETTE)
    order = rng.permutation(len(names))
    pair_colours = [names[order[0]], names[order[1]]]
    other_colours = [names[i] for i in order[2:]]
    pair_shapes = rng.choice(SPRITE_SHAPES, size=2, replace=False)
    r = 0.03 * w
    tc = _frame_aligned(float(rng.uniform(0.15, 0.85)) * duration, cfg.fps)
    meet_x = float(rng.uniform(0.35 * w, 0.65 * w))
    meet_y = float(rng.uniform(0.68 * h, 0.85 * h))
    pair = (
        Sprite(str(pair_shapes[0]), pair_colours[0], r, meet_x, meet_y, 0.0, 0.0),
        Sprite(str(pair_shapes[1]), pair_colours[1], r, meet_x, meet_y, 0.0, 0.0),
    )
    sprites = []
    for _ in range(int(rng.integers(4, 7))):
        rad = float(rng.uniform(0.02, 0.035)) * w
        speed = float(rng.uniform(0.05, 0.15)) * w
        ang = float(rng.uniform(0, 2 * math.pi))
        sprites.append(Sprite(
            str(rng.choice(SPRITE_SHAPES)), other_colours[int(rng.integers(len(other_colours)))], rad,
            float(rng.uniform(rad, w - rad)), float(rng.uniform(rad, h - rad)), speed * math.cos(ang), speed * math.sin(ang),
        ))
    signs = _make_signs(rng, cfg, duration)
    return VideoSpec(int(seed), cfg, duration, tuple(sprites), signs, pair, tc, approach_speed=0.06 * w, max_gap=0.3 * w)


def _pair_positions(spec: VideoSpec, t: float) -> tuple[tuple[float, float], tuple[float, float]]:
    a, b = spec.pair
    gap = min(2 * spec.approach_speed * abs(t - spec.collision_time), spec.max_gap)
    half = a.radius + gap / 2  # centres 2r apart at tc: the sprites touch
    return (a.x0 - half, a.y0), (b.x0 + half, b.y0)


def draw_sign(img: np.ndarray, s: Sign) -> None:
    half = s.side / 2
    col = PALETTE[s.colour]
    p1 = (int(round(s.cx - half)), int(round(s.cy - half)))
    p2 = (int(round(s.cx + half)), int(round(s.cy + half)))
    cv2.rectangle(img, p1, p2, col, -1)
    cv2.rectangle(img, p1, p2, (250, 250, 250), 1)
    if s.letter in STRIPES:
        inner = s.side * 0.35
        cx, cy = s.cx + s.dx * s.side, s.cy + s.dy * s.side
        draw_stripes(img, s.letter, int(round(cx - inner)), int(round(cy - inner)), int(round(cx + inner)), int(round(cy + inner)))
        return
    ink = (15, 15, 15) if sum(col) > 380 else (250, 250, 250)
    thick = max(1, int(round(s.side / 14)))
    (_, h1), _ = cv2.getTextSize("H", s.font, 1.0, thick)
    scale = s.side * 0.6 / max(h1, 1)  # capitals 0.6 of the board, whatever the font
    (tw, th), _ = cv2.getTextSize(s.letter, s.font, scale, thick)
    org = (int(round(s.cx + s.dx * s.side - tw / 2)), int(round(s.cy + s.dy * s.side + th / 2)))
    cv2.putText(img, s.letter, org, s.font, scale, ink, thick, cv2.LINE_AA)


def render_frame(spec: VideoSpec, bg: np.ndarray, i: int) -> np.ndarray:
    """Frame ``i`` (shown at ``i / fps`` s) as uint8 RGB ``(H, W, 3)``."""
    cfg = spec.config
    t = i / cfg.fps
    img = bg.copy()
    for s in spec.sprites:
        x, y = s.position(t, cfg.width, cfg.height)
        draw_shape(img, s.shape, x, y, s.radius, PALETTE[s.colour])
    for s, (x, y) in zip(spec.pair, _pair_positions(spec, t)):
        draw_shape(img, s.shape, x, y, s.radius, PALETTE[s.colour])
    if abs(t - spec.collision_time) < 0.3:  # the flash of the impact
        a = spec.pair[0]
        cv2.circle(img, (int(a.x0), int(a.y0)), int(a.radius * 1.8), (255, 255, 200), 2, cv2.LINE_AA)
    for s in spec.signs:
        if s.start <= t < s.end:
            draw_sign(img, s)
    return img


def _frames(spec: VideoSpec) -> Iterator[np.ndarray]:
    bg = background(np.random.default_rng([spec.seed, SALT, GEN_VERSION, 1]), spec.config.height, spec.config.width)
    for i in range(spec.num_frames):
        yield render_frame(spec, bg, i)


def ensure_video(spec: VideoSpec, cache_dir: Path, *, max_bytes: int | None = None) -> Path:
    """The MP4 of ``spec`` in ``cache_dir``, rendered and written on first use.

    A cached file's modification time is set to now on every use, so with ``max_bytes``
    the folder is an LRU cache: after a new video is written, the least recently used ones
    are deleted until the folder's MP4s fit (see ``prune_cache``)."""
    path = Path(cache_dir) / spec.filename()
    if path.is_file():
        try:
            os.utime(path)
        except OSError:  # evicted by another process meanwhile, or a read-only cache: still usable or re-rendered
            pass
        return path
    write_mp4(path, _frames(spec), spec.config.fps)
    if max_bytes is not None:
        prune_cache(Path(cache_dir), max_bytes, keep=path)
    return path


def prune_cache(cache_dir: Path, max_bytes: int, *, keep: Path | None = None) -> int:
    """Delete the least recently used MP4s of ``cache_dir`` (oldest modification time first)
    until the rest take at most ``max_bytes``; never ``keep``. Returns how many were deleted.

    Safe with several processes sharing the folder: a video deleted while another env has it
    open stays readable through the open file (POSIX), and one deleted between its lookup
    and its opening is rendered again by the env."""
    files: list[tuple[float, int, Path]] = []
    for entry in os.scandir(cache_dir):
        if entry.name.endswith(".mp4") and not entry.name.startswith(".") and entry.is_file():
            try:
                st = entry.stat()
            except FileNotFoundError:  # deleted by another process meanwhile
                continue
            files.append((st.st_mtime, st.st_size, Path(entry.path)))
    total = sum(size for _, size, _ in files)
    removed = 0
    for _, size, p in sorted(files):
        if total <= max_bytes:
            break
        if keep is not None and p.name == keep.name:
            continue
        try:
            p.unlink()
            removed += 1
        except FileNotFoundError:
            pass
        total -= size
    return removed
