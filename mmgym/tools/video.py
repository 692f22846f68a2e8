"""Video frame tools: ``crop_video``, ``get_frames`` and ``zoom_frame``.

Modelled on LongVT's ``crop_video(start_time, end_time)`` (frames of a span at a higher
rate, 1-128 frames, at most 224 px), LOVE-R1's adaptive temporal zoom-in (a zoom asks
``[start, end]`` and gets ``min(2 * (end - start), 16)`` frames at a higher resolution;
valid inside ``[0, D]``, ``1 <= end - start <= min(D / 2, 60)`` s, rejected when its IoU
with an earlier zoom is above 0.7) and VITAL's frame look-ups.

The tools are generic: they read frames through a ``FrameReader`` (anything with
``duration``, ``fps``, ``width``, ``height`` and ``read(times)``), which raises
``FrameReadError`` when the file cannot be decoded. Every failure — a span outside the
video, a reversed or too short span, a repeat, a decode error — is a ``ToolResult``
error whose text says what was wrong and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np

from mmgym.core import ToolResult
from mmgym.tools.zoom import MIN_SIDE, BBoxZoomTool, resize_max_side

__all__ = [
    "FrameReadError",
    "FrameReader",
    "VideoToolState",
    "CropVideoTool",
    "GetFramesTool",
    "ZoomFrameTool",
    "draw_timestamp",
    "span_iou",
    "format_time",
]


class FrameReadError(ValueError):
    """A reader could not decode the frames asked for (corrupt or truncated file)."""


@runtime_checkable
class FrameReader(Protocol):
    """Frames of one video by timestamp. ``read`` returns ``(frame_time, rgb_frame)`` per
    distinct nearest frame, in time order, at native resolution."""

    duration: float
    fps: float
    width: int
    height: int

    def read(self, times: Sequence[float]) -> list[tuple[float, np.ndarray]]: ...


@dataclass(slots=True)
class VideoToolState:
    """Per-episode state of the video tools: the reader and the spans cropped so far."""

    reader: FrameReader
    spans: list[tuple[float, float]] = field(default_factory=list)
    draw_times: bool = True


def format_time(t: float) -> str:
    """``12.0 -> '12s'``, ``12.25 -> '12.2s'`` (one decimal at most)."""
    r = round(float(t), 1)
    return f"{int(r)}s" if r == int(r) else f"{r:.1f}s"


def draw_timestamp(frame: np.ndarray, t: float) -> np.ndarray:
    """A copy of ``frame`` with ``t`` written in its top-left corner (LOVE-R1 draws the
    timestamp on each frame so the model can cite times it sees)."""
    out = np.ascontiguousarray(frame).copy()
    h, w = out.shape[:2]
    scale = max(0.28, min(w, h) / 320)
    label = format_time(t)
    (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    cv2.rectangle(out, (0, 0), (min(w - 1, tw + 3), min(h - 1, th + base + 3)), (0, 0, 0), -1)
    cv2.putText(out, label, (2, th + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def span_iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = (a[1] - a[0]) + (b[1] - b[0]) - inter
    return inter / union if union > 0 else 0.0


def _to_float(x: Any, name: str) -> float | str:
    """A finite float from a JSON number, or an error message (huge ints overflow)."""
    try:
        v = float(x)
    except (TypeError, ValueError, OverflowError):
        return f"{name} must be a number of seconds, got {str(x)[:40]}"
    if not math.isfinite(v):
        return f"{name} must be a finite number of seconds"
    return v


_NUMBER = {"type": "number"}


class CropVideoTool:
    """``crop_video(start_time, end_time)``: frames of the span at up to ``fps`` frames/s
    (at most ``max_frames``, at least 1) resized to ``max_side`` px (LongVT, LOVE-R1).

    Args:
        fps: sampling rate inside the span (LOVE-R1: 2 fps).
        max_frames: frames per call (LOVE-R1: 16; LongVT: up to 128).
        max_side: longer side of the returned frames (LongVT: 224).
        min_span / max_span: allowed span length in seconds; the upper bound is also at
            most half the video (LOVE-R1 ``min(D / 2, 60)``).
        repeat_iou: a span whose IoU with an earlier one exceeds this is rejected.
        slack: seconds past the end of the video still accepted (clipped; LOVE-R1 ``D + 1``).
    """

    name = "crop_video"

    def __init__(
        self,
        *,
        fps: float = 2.0,
        max_frames: int = 16,
        max_side: int = 224,
        min_span: float = 1.0,
        max_span: float = 60.0,
        repeat_iou: float = 0.7,
        slack: float = 1.0,
    ):
        if fps <= 0 or max_frames < 1 or max_side < 8 or not 0 < min_span <= max_span:
            raise ValueError(f"crop_video needs fps > 0, max_frames >= 1, max_side >= 8, 0 < min_span <= max_span; got {fps}, {max_frames}, {max_side}, {min_span}, {max_span}")
        self.fps, self.max_frames, self.max_side = float(fps), int(max_frames), int(max_side)
        self.min_span, self.max_span = float(min_span), float(max_span)
        self.repeat_iou, self.slack = float(repeat_iou), float(slack)
        self.description = (
            f"Look closer at a part of the video: returns up to {self.max_frames} frames between start_time and "
            f"end_time (seconds) at up to {self.fps:g} frames/s and higher resolution. The span must lie inside the "
            f"video, be at least {self.min_span:g} s long and at most min(half the video, {self.max_span:g} s)."
        )
        self.parameters: dict[str, Any] = {
            "type": "object",
            "properties": {
                "start_time": {**_NUMBER, "description": "start of the span in seconds"},
                "end_time": {**_NUMBER, "description": "end of the span in seconds"},
            },
            "required": ["start_time", "end_time"],
            "additionalProperties": False,
        }

    def check_span(self, start: Any, end: Any, duration: float, seen: Sequence[tuple[float, float]]) -> tuple[float, float] | str:
        """The clipped span, or the reason it is invalid (LOVE-R1's validity rules)."""
        s, e = _to_float(start, "start_time"), _to_float(end, "end_time")
        for v in (s, e):
            if isinstance(v, str):
                return v
        if s < 0 or e > duration + self.slack:
            return f"span [{s:g}, {e:g}] lies outside the video, which runs from 0 to {duration:.1f} s"
        if e <= s:
            return f"span [{s:g}, {e:g}] is reversed or empty: need start_time < end_time"
        e = min(e, duration)
        longest = min(max(self.min_span, duration / 2), self.max_span)
        if e - s < self.min_span - 1e-9:
            return f"span [{s:g}, {e:g}] is {e - s:.2f} s long; it must be at least {self.min_span:g} s"
        if e - s > longest + 1e-9:
            return f"span [{s:g}, {e:g}] is {e - s:.1f} s long; at most {longest:g} s per call: look at a shorter part"
        for a, b in seen:
            if span_iou((s, e), (a, b)) > self.repeat_iou:
                return f"span [{s:g}, {e:g}] repeats the span [{a:g}, {b:g}] already seen; look at a different part"
        return s, e

    def sample_times(self, s: float, e: float) -> list[float]:
        """Frame centres spread evenly over ``[s, e]``."""
        n = max(1, min(self.max_frames, int(math.ceil((e - s) * self.fps - 1e-9))))
        step = (e - s) / n
        return [s + step * (i + 0.5) for i in range(n)]

    def __call__(self, state: VideoToolState, start_time: float, end_time: float) -> ToolResult:
        r = state.reader
        span = self.check_span(start_time, end_time, r.duration, state.spans)
        if isinstance(span, str):
            return ToolResult.fail(span)
        s, e = span
        try:
            got = r.read(self.sample_times(s, e))
        except FrameReadError as err:
            return ToolResult.fail(f"could not decode frames of [{s:g}, {e:g}]: {err}")
        state.spans.append((s, e))
        frames = tuple(_label(resize_max_side(f, self.max_side), t, state.draw_times) for t, f in got)
        times = tuple(float(t) for t, _ in got)
        listed = ", ".join(format_time(t) for t in times)
        return ToolResult(text=f"Frames of [{s:g}, {e:g}] s at {listed}: <video>", frames=frames, frame_times=times)


def _label(frame: np.ndarray, t: float, draw: bool) -> np.ndarray:
    return draw_timestamp(frame, t) if draw else np.ascontiguousarray(frame)


class GetFramesTool:
    """``get_frames(times=[...])``: the frames nearest the given timestamps at full resolution."""

    name = "get_frames"

    def __init__(self, *, max_times: int = 8):
        if max_times < 1:
            raise ValueError(f"get_frames max_times must be >= 1, got {max_times}")
        self.max_times = int(max_times)
        self.description = (
            f"Get the frames nearest the given timestamps (seconds, 1 to {self.max_times} of them) at full resolution."
        )
        self.parameters: dict[str, Any] = {
            "type": "object",
            "properties": {"times": {"type": "array", "items": _NUMBER, "minItems": 1, "maxItems": self.max_times}},
            "required": ["times"],
            "additionalProperties": False,
        }

    def __call__(self, state: VideoToolState, times: list[float]) -> ToolResult:
        r = state.reader
        wanted: list[float] = []
        for i, t in enumerate(times):
            v = _to_float(t, f"times[{i}]")
            if isinstance(v, str):
                return ToolResult.fail(v)
            if not 0 <= v <= r.duration:
                return ToolResult.fail(f"times[{i}] = {v:g} lies outside the video, which runs from 0 to {r.duration:.1f} s")
            wanted.append(v)
        try:
            got = r.read(wanted)
        except FrameReadError as err:
            return ToolResult.fail(f"could not decode frames: {err}")
        frames = tuple(_label(f, t, state.draw_times) for t, f in got)
        ftimes = tuple(float(t) for t, _ in got)
        listed = ", ".join(format_time(t) for t in ftimes)
        return ToolResult(text=f"Frames at {listed} ({r.width}x{r.height} px): <video>", frames=frames, frame_times=ftimes)


class ZoomFrameTool:
    """``zoom_frame(time, bbox)``: a spatial crop ``[x1, y1, x2, y2]`` (pixels of the full
    frame) of the frame nearest ``time``, enlarged to ``max_side`` px. Box rules follow
    DeepEyes (clamped, sides under 28 px grown to 28, aspect ratio at most 100)."""

    name = "zoom_frame"

    def __init__(self, *, max_side: int = 224):
        self.max_side = int(max_side)
        self._box = BBoxZoomTool("deepeyes", max_side=self.max_side)
        self.description = (
            "Zoom into a region of one frame: time in seconds, bbox [x1, y1, x2, y2] in pixels of the "
            "full-resolution frame (its size is given in the task). Returns the enlarged region."
        )
        self.parameters: dict[str, Any] = {
            "type": "object",
            "properties": {
                "time": {**_NUMBER, "description": "timestamp in seconds"},
                "bbox": {"type": "array", "items": _NUMBER, "minItems": 4, "maxItems": 4},
            },
            "required": ["time", "bbox"],
            "additionalProperties": False,
        }

    def __call__(self, state: VideoToolState, time: float, bbox: list[float]) -> ToolResult:
        r = state.reader
        t = _to_float(time, "time")
        if isinstance(t, str):
            return ToolResult.fail(t)
        if not 0 <= t <= r.duration:
            return ToolResult.fail(f"time {t:g} lies outside the video, which runs from 0 to {r.duration:.1f} s")
        vals = [_to_float(v, "bbox") for v in bbox]
        bad = next((v for v in vals if isinstance(v, str)), None)
        if bad is not None:
            return ToolResult.fail(bad)
        box = self._box.box_for(vals, r.width, r.height)
        if isinstance(box, str):
            return ToolResult.fail(box)
        try:
            (ft, frame), = r.read([t])
        except FrameReadError as err:
            return ToolResult.fail(f"could not decode the frame at {t:g} s: {err}")
        x1, y1, x2, y2 = box
        crop = frame[y1:y2, x1:x2]
        out = resize_max_side(crop, max(min(self.max_side, MIN_SIDE * 4), min(self.max_side, max(crop.shape[:2]) * 2)))
        return ToolResult(
            text=f"Zoomed into [{x1}, {y1}, {x2}, {y2}] of the frame at {format_time(ft)}: <image>",
            images=(np.ascontiguousarray(out),),
        )
