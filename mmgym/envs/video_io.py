"""Video I/O: decord with a PyAV fallback, per-episode frame caching, MP4 writing.

``VideoSource`` opens one file and returns the frames nearest given timestamps. Backend
``"auto"`` uses decord (pip extra ``mmgym[video]``) when it is installed and falls back
to PyAV when decord is missing or fails on the file; ``"pyav"`` and ``"decord"`` force one.
Only the frames asked for are decoded (PyAV seeks to the keyframe before each group of
wanted frames), so a long video is never decoded whole, and a decoded frame is kept in
an LRU cache for the episode, so a span is decoded once.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from mmgym.tools.video import FrameReadError

__all__ = ["VideoError", "VideoMeta", "VideoSource", "probe_video", "write_mp4", "decord_available", "Backend"]

log = logging.getLogger(__name__)
Backend = Literal["auto", "decord", "pyav"]
DEFAULT_MAX_DECODE = 4000  # frames one request may decode (guards against keyframe-less files)


class VideoError(FrameReadError):
    """A video file cannot be opened or decoded; the message names the file and why."""


@dataclass(slots=True, frozen=True)
class VideoMeta:
    num_frames: int
    fps: float
    width: int
    height: int

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps


class _Decoder(Protocol):
    name: str
    meta: VideoMeta

    def decode(self, indices: Sequence[int]) -> dict[int, np.ndarray]: ...

    def close(self) -> None: ...


def decord_available() -> bool:
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


class _PyAVDecoder:
    """Seek to the keyframe before each group of wanted frames, then decode forward."""

    name = "pyav"

    def __init__(self, path: Path, max_decode: int = DEFAULT_MAX_DECODE):
        import av

        self.path, self.max_decode = path, int(max_decode)
        try:
            self._c = av.open(str(path))
            s = self._c.streams.video[0]
        except (av.FFmpegError, IndexError, OSError, ValueError) as e:
            raise VideoError(f"video {path.name!r} cannot be opened with PyAV ({type(e).__name__})") from None
        self._s = s
        fps = float(s.average_rate or s.guessed_rate or 0)
        if s.duration is not None and s.time_base is not None:
            dur = float(s.duration * s.time_base)
        else:
            dur = (self._c.duration or 0) / 1e6
        n = int(s.frames) or int(round(dur * fps))
        w, h = int(s.codec_context.width), int(s.codec_context.height)
        if fps <= 0 or n <= 0 or w <= 0 or h <= 0:
            self.close()
            raise VideoError(f"video {path.name!r} has no readable frames (fps={fps:g}, frames={n}, size={w}x{h})")
        self.meta = VideoMeta(n, fps, w, h)
        self._start = float(s.start_time * s.time_base) if s.start_time is not None else 0.0

    def _groups(self, indices: Sequence[int]) -> list[list[int]]:
        gap = max(2, int(self.meta.fps * 2))  # decode through short gaps instead of seeking
        groups: list[list[int]] = []
        for i in sorted(set(indices)):
            if groups and i - groups[-1][-1] <= gap:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    def decode(self, indices: Sequence[int]) -> dict[int, np.ndarray]:
        import av

        out: dict[int, np.ndarray] = {}
        budget = self.max_decode
        for group in self._groups(indices):
            want = set(group)
            target = self._start + group[0] / self.meta.fps
            last, last_frame = -1, None
            try:
                self._c.seek(int(target / self._s.time_base), stream=self._s, backward=True, any_frame=False)
                for frame in self._c.decode(self._s):
                    budget -= 1
                    if budget < 0:
                        raise VideoError(f"video {self.path.name!r}: more than {self.max_decode} frames to decode for one request (too few keyframes)")
                    t = float(frame.time) if frame.time is not None else 0.0
                    last, last_frame = int(round((t - self._start) * self.meta.fps)), frame
                    done = [i for i in want if i <= last]  # exact, or skipped over by a variable frame rate
                    if done:
                        arr = frame.to_ndarray(format="rgb24")
                        out.update({i: arr for i in done})
                        want.difference_update(done)
                    if last >= group[-1] or not want:
                        break
            except (av.FFmpegError, OSError, ValueError) as e:
                raise VideoError(f"video {self.path.name!r} failed to decode near {target:.1f} s ({type(e).__name__})") from None
            if want:
                # The stream ended early. Container metadata may over-count by a frame or
                # two (then the last frame stands in); more missing means a truncated file.
                if last_frame is None or max(want) - last > 2:
                    raise VideoError(f"video {self.path.name!r} is truncated or corrupt: frames from {min(want)} on could not be decoded")
                fill = last_frame.to_ndarray(format="rgb24")
                out.update({i: fill for i in want})
        return out

    def close(self) -> None:
        c = getattr(self, "_c", None)
        if c is not None:
            c.close()
            self._c = None


class _DecordDecoder:
    name = "decord"

    def __init__(self, path: Path):
        import decord  # noqa: F401

        self.path = path
        try:
            self._vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
            n = len(self._vr)
            fps = float(self._vr.get_avg_fps())
            h, w = self._vr[0].shape[:2]
        except (decord.DECORDError, RuntimeError, ValueError, OSError) as e:
            raise VideoError(f"video {path.name!r} cannot be opened with decord ({type(e).__name__})") from None
        if n <= 0 or not fps > 0:
            raise VideoError(f"video {path.name!r} has no readable frames")
        self.meta = VideoMeta(int(n), fps, int(w), int(h))

    def decode(self, indices: Sequence[int]) -> dict[int, np.ndarray]:
        import decord  # noqa: F401

        idx = sorted(set(int(i) for i in indices))
        try:
            batch = self._vr.get_batch(idx).asnumpy()
        except (decord.DECORDError, RuntimeError, ValueError, IndexError) as e:
            raise VideoError(f"video {self.path.name!r} failed to decode with decord ({type(e).__name__})") from None
        return {i: np.ascontiguousarray(batch[k]) for k, i in enumerate(idx)}

    def close(self) -> None:
        self._vr = None


def _open_decoder(path: Path, backend: Backend, max_decode: int) -> _Decoder:
    if backend not in ("auto", "decord", "pyav"):
        raise ValueError(f"unknown video backend {backend!r}; use 'auto', 'decord' or 'pyav'")
    if backend == "decord" and not decord_available():
        raise ImportError("video backend 'decord' needs decord: pip install 'mmgym[video]' (or use backend='pyav')")
    if backend in ("auto", "decord") and decord_available():
        try:
            return _DecordDecoder(path)
        except VideoError as e:
            if backend == "decord":
                raise
            log.debug("decord failed on %s, falling back to PyAV: %s", path.name, e)
    return _PyAVDecoder(path, max_decode)


class VideoSource:
    """Frames of one video by timestamp, decoded lazily and cached (an LRU of
    ``cache_frames`` native-resolution frames). Implements ``mmgym.tools.video.FrameReader``.

    ``hits`` / ``misses`` count frame look-ups served from the cache / decoded.
    """

    def __init__(self, path: str | Path, *, backend: Backend = "auto", cache_frames: int = 256, max_decode: int = DEFAULT_MAX_DECODE):
        self.path = Path(path)
        if not self.path.is_file():
            raise VideoError(f"video {self.path.name!r} does not exist")
        self.backend = backend
        self.max_decode = int(max_decode)
        self._dec: _Decoder = _open_decoder(self.path, backend, self.max_decode)
        self.meta = self._dec.meta
        self.cache_frames = int(cache_frames)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.hits = 0
        self.misses = 0

    # FrameReader protocol
    @property
    def duration(self) -> float:
        return self.meta.duration

    @property
    def fps(self) -> float:
        return self.meta.fps

    @property
    def width(self) -> int:
        return self.meta.width

    @property
    def height(self) -> int:
        return self.meta.height

    @property
    def decoder_name(self) -> str:
        return self._dec.name

    def index_of(self, t: float) -> int:
        """The frame nearest time ``t`` (frame ``i`` is shown at ``i / fps``)."""
        i = int(math.floor(float(t) * self.meta.fps + 0.5))
        return min(max(i, 0), self.meta.num_frames - 1)

    def read(self, times: Sequence[float]) -> list[tuple[float, np.ndarray]]:
        idx = sorted({self.index_of(t) for t in times})
        frames = self.frames(idx)
        return [(i / self.meta.fps, frames[i]) for i in idx]

    def frames(self, indices: Iterable[int]) -> dict[int, np.ndarray]:
        idx = sorted(set(int(i) for i in indices))
        missing = [i for i in idx if i not in self._cache]
        self.hits += len(idx) - len(missing)
        self.misses += len(missing)
        if missing:
            for i, f in self._decode(missing).items():
                self._cache[i] = f
        out = {}
        for i in idx:
            self._cache.move_to_end(i)
            out[i] = self._cache[i]
        while len(self._cache) > max(self.cache_frames, len(idx)):
            self._cache.popitem(last=False)
        return out

    def _decode(self, missing: list[int]) -> dict[int, np.ndarray]:
        try:
            got = self._dec.decode(missing)
        except VideoError as e:
            if self._dec.name != "decord" or self.backend != "auto":
                raise
            log.debug("decord failed on %s, retrying with PyAV: %s", self.path.name, e)
            self._dec.close()
            self._dec = _PyAVDecoder(self.path, self.max_decode)
            got = self._dec.decode(missing)
        lost = [i for i in missing if i not in got]
        if lost:
            raise VideoError(f"video {self.path.name!r}: frames {lost[:3]} could not be decoded")
        return got

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def close(self) -> None:
        self._dec.close()
        self._cache.clear()

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def probe_video(path: Path, backend: Backend = "auto") -> VideoMeta:
    """Open ``path``, decode its first and last frame, and return its metadata.

    Raises ``VideoError`` for a missing, corrupt or truncated file.
    """
    with VideoSource(path, backend=backend, cache_frames=2) as src:
        src.frames([0, src.meta.num_frames - 1])
        return src.meta


def write_mp4(path: Path, frames: Iterable[np.ndarray], fps: float, *, gop: int | None = None, crf: int = 23) -> None:
    """Encode RGB frames to an H.264 MP4 (MPEG-4 part 2 if libx264 is missing) with a
    keyframe every ``gop`` frames (default: one per second, so seeking stays cheap).

    Written to a temporary name and renamed, so concurrent workers never see half a file.
    """
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    rate = int(round(fps))
    try:
        with av.open(str(tmp), "w", format="mp4") as c:
            s = c.add_stream(codec, rate=rate)
            s.pix_fmt = "yuv420p"
            s.options = {"g": str(gop or rate), "crf": str(crf), "preset": "ultrafast"} if codec == "libx264" else {"g": str(gop or rate)}
            s.thread_count = 1
            first = True
            for f in frames:
                if first:
                    s.height, s.width = f.shape[:2]
                    first = False
                for pkt in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                    c.mux(pkt)
            for pkt in s.encode():
                c.mux(pkt)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
