"""``mmgym/VideoFrames-v0``: answer questions about a long video that the agent first sees
only as a sparse, low-resolution overview, using frame tools to look closer.

Modelled on LOVE-R1 (adaptive temporal zoom-in: an overview of uniformly sampled
low-resolution frames with their timestamps drawn on them, then zooms into
``[start, end]`` spans at a higher rate and resolution), LongVT (the ``crop_video``
tool; reward ``acc + fmt + IoU(last crop, gt span)``, weights 1/1/1 as the ``longvt``
rubric) and "Thinking With Videos" (VITAL: frame tools inside the reasoning).

Tools: ``crop_video(start_time, end_time)``, ``get_frames(times)``,
``zoom_frame(time, bbox)`` (see ``mmgym.tools.video``). Answers: multiple choice
(``<answer>B</answer>``), open (``<answer>K</answer>``) and temporal grounding
(``<answer>[12.5, 16.0]</answer>``; correct when tIoU >= ``tiou_threshold``).

Tasks come from the procedural generator (``mmgym.envs.video_scenes``: real MP4 files
cached by seed) or from a JSONL dataset (``dataset=...``; see ``video_rows``).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mmgym.core import ToolCall, ToolResult
from mmgym.envs.base import MMEnv, Task, Verdict
from mmgym.envs.datasets import DatasetError, LoadReport, RowError, load_rows, read_jsonl, resolve_in_root
from mmgym.envs.scenes import STRIPES
from mmgym.envs.video_io import Backend, VideoError, VideoSource, probe_video
from mmgym.envs.video_scenes import SIGN_LETTERS, SceneConfig, VideoSpec, default_cache_dir, draw_sign, ensure_video, make_spec, symbol_set
from mmgym.rewards import LETTERS, RUBRICS, RewardContext, RewardFn, Rubric, choice_match, exact_match, parse_span, temporal_iou
from mmgym.tools.video import CropVideoTool, GetFramesTool, VideoToolState, ZoomFrameTool, draw_timestamp, format_time
from mmgym.tools.zoom import resize_max_side

__all__ = ["VideoFramesEnv", "VideoTask", "video_rows", "video_rubric", "random_agent", "overview_agent", "overview_reader_agent", "QUESTION_TYPES"]

log = logging.getLogger(__name__)
QUESTION_TYPES = ("letter_choice", "letter_open", "sign_span", "collision_span")
_TASK_SALT = 0x71DE


# ---------------------------------------------------------------------- rewards
def _fmt01(ctx: RewardContext) -> float:
    return 1.0 if ctx.format_ok and ctx.tags_ok else 0.0


def _metric(name: str) -> Any:
    def fn(ctx: RewardContext) -> float:
        return float(ctx.metrics.get(name, 0.0))

    fn.__name__ = f"metric_{name}"
    return fn


def video_rubric(crop_tiou: float = 0.0) -> Rubric:
    """``1.0 acc + 0.1 fmt + 1.0 IoU(answer span, gt span)`` (+ ``crop_tiou`` x IoU of the
    last crop with the gt span, LongVT's term; 0 leaves it out). The answer-IoU term is 0
    for choice and open questions."""
    terms = [RewardFn("accuracy", 1.0, lambda c: float(c.accuracy)), RewardFn("format", 0.1, _fmt01), RewardFn("answer_tiou", 1.0, _metric("answer_tiou"))]
    if crop_tiou:
        terms.append(RewardFn("crop_tiou", float(crop_tiou), _metric("last_crop_tiou")))
    return Rubric(terms)


RUBRICS.register("video", video_rubric)


# ---------------------------------------------------------------------- tasks
@dataclass(slots=True)
class VideoTask(Task):
    """One question about one video. ``span`` is the ground-truth segment (or ``None``)."""

    path: str = ""
    qtype: str = "choice"  # choice | open | grounding
    question: str = ""
    options: tuple[str, ...] = ()
    correct: int = -1
    answers: tuple[str, ...] = ()
    span: tuple[float, float] | None = None
    duration: float = 0.0
    width: int = 0
    height: int = 0


@dataclass(slots=True, frozen=True)
class _Row:
    path: Path
    qtype: str
    question: str
    options: tuple[str, ...]
    correct: int
    answers: tuple[str, ...]
    span: tuple[float, float] | None
    row_id: str


def _parse_answer(d: dict, line: int) -> tuple[str, tuple[str, ...], int, tuple[str, ...]]:
    """``(qtype, options, correct, answers)`` of one JSONL row."""
    options, answer, kind = d.get("options"), d.get("answer"), d.get("type")
    if options is not None:
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise RowError(f"line {line}: options must be a list of at least 2 strings")
        if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
            return "choice", tuple(options), answer, ()
        if isinstance(answer, str):
            a = answer.strip()
            if len(a) == 1 and a.upper() in LETTERS[: len(options)]:
                return "choice", tuple(options), LETTERS.index(a.upper()), ()
            if a in options:
                return "choice", tuple(options), options.index(a), ()
        raise RowError(f"line {line}: answer missing: give the option index, its letter or its text")
    if kind == "grounding" or (answer is None and d.get("span") is not None):
        return "grounding", (), -1, ()
    if isinstance(answer, str) and answer.strip():
        return "open", (), -1, (answer,)
    if isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer):
        return "open", (), -1, tuple(answer)
    raise RowError(f"line {line}: answer missing: give options + answer, an answer string, or a span")


def _parse_span(raw: Any, line: int) -> tuple[float, float] | None:
    if raw is None:
        return None
    try:
        s, e = (float(v) for v in raw)
    except (TypeError, ValueError, OverflowError):
        raise RowError(f"line {line}: span must be [start, end] in seconds") from None
    if not (math.isfinite(s) and math.isfinite(e) and 0 <= s < e):
        raise RowError(f"line {line}: span [{s}, {e}] must satisfy 0 <= start < end")
    return s, e


def video_rows(path: str | Path, root: str | Path | None = None, backend: Backend = "auto") -> tuple[list[_Row], LoadReport]:
    """Rows of a JSONL video-QA file, one object per line::

        {"video": "clips/a.mp4", "question": "...", "options": ["..", ".."], "answer": "B",
         "span": [12.0, 17.5], "id": "q1"}

    ``video`` is relative to ``root`` (default: the file's folder) and may not leave it.
    With ``options`` the answer is the option's index, letter or text (choice); without,
    an answer string or list of strings (open); ``"type": "grounding"`` or a ``span``
    without an answer asks for the span itself. Rows whose video is missing, corrupt or
    truncated are skipped and counted (one warning); no valid row raises ``DatasetError``.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"video dataset file {str(path)!r} does not exist")
    base = Path(root) if root is not None else path.parent

    def parse(item: tuple[int, Any]) -> _Row:
        line, d = item
        if isinstance(d, RowError):
            raise d
        if not isinstance(d, dict) or not isinstance(d.get("question"), str):
            raise RowError(f"line {line}: missing question")
        qtype, options, correct, answers = _parse_answer(d, line)
        span = _parse_span(d.get("span"), line)
        if qtype == "grounding" and span is None:
            raise RowError(f"line {line}: missing span for a grounding question")
        video = resolve_in_root(base, d.get("video"))
        try:
            meta = probe_video(video, backend)
        except VideoError as e:
            kind = "does not exist" if "does not exist" in str(e) else "corrupt"
            raise RowError(f"video {video.name!r} {kind} ({e})") from None
        if span is not None and span[0] >= meta.duration:
            raise RowError(f"line {line}: span starts after the video ends ({meta.duration:.1f} s)")
        return _Row(video, qtype, d["question"], options, correct, answers, span, str(d.get("id", f"line{line}")))

    return load_rows(str(path), read_jsonl(path), parse)


# ---------------------------------------------------------------------- env
class VideoFramesEnv(MMEnv):
    """Long-video QA with frame tools. See the module docstring.

    Args:
        dataset: a JSONL file (see ``video_rows``); without it, procedural videos.
        root: dataset root for video paths (default: the JSONL's folder).
        cache_dir: where generated MP4s live (default ``$MMGYM_CACHE/videos`` or
            ``~/.cache/mmgym/videos``).
        cache_max_mb: bound on that folder's MP4s: after writing a video, the least recently
            used ones are deleted until the rest fit (``None``: unbounded). Procedural
            episodes draw fresh video seeds unless ``num_videos`` is set, so without a bound
            a long run fills the disk (the video example, 2,048 demonstrations plus evaluation,
            wrote 2,592 videos of 20-45 s: 1.5 GB).
        backend: ``"auto"`` (decord if installed, else / on failure PyAV), ``"decord"``, ``"pyav"``.
        video_size, video_fps, duration: generated videos (px, frames/s, seconds range).
        sign_frac: a sign board's side as a fraction of the video width.
        sign_symbols: what the boards show: ``"letters"`` (default) or ``"stripes"`` (one of
            four stripe orientations with equal ink, as ChainOfFocus's ``symbols="stripes"``;
            the letter questions then ask for the pattern).
        num_videos: draw procedural videos from this many seeds (``None``: unbounded).
        question_types: subset of ``QUESTION_TYPES``.
        overview_frames / overview_size: N uniform overview frames, longer side in px.
        crop_fps, crop_frames, crop_size, min_span, max_span, repeat_iou: ``crop_video``.
        get_frames_max: timestamps per ``get_frames`` call; zoom_size: ``zoom_frame`` output.
        tiou_threshold: a grounding answer is correct when its tIoU reaches this.
        crop_reward: turn-level reward paid once, for the first crop that overlaps the
            gt span (LOVE-R1's zoom score); 0 disables it.
        crop_tiou: weight of IoU(last crop, gt span) in the default ``video`` rubric.
        rubric: ``"video"`` (default), another preset name (``"longvt"``) or a ``Rubric``.
    """

    description = "Long-video QA: a sparse low-res overview, then crop_video / get_frames / zoom_frame to look closer."

    def __init__(
        self,
        *,
        dataset: str | None = None,
        root: str | None = None,
        cache_dir: str | None = None,
        cache_max_mb: float | None = 4096.0,
        backend: Backend = "auto",
        video_size: tuple[int, int] = (320, 240),
        video_fps: int = 8,
        duration: tuple[int, int] = (30, 75),
        sign_frac: float = 0.075,
        sign_symbols: str = "letters",
        num_videos: int | None = None,
        question_types: tuple[str, ...] = QUESTION_TYPES,
        overview_frames: int = 16,
        overview_size: int = 96,
        crop_fps: float = 2.0,
        crop_frames: int = 16,
        crop_size: int = 224,
        min_span: float = 1.0,
        max_span: float = 60.0,
        repeat_iou: float = 0.7,
        get_frames_max: int = 8,
        zoom_size: int = 224,
        tiou_threshold: float = 0.5,
        crop_reward: float = 0.0,
        crop_tiou: float = 0.0,
        rubric: str | Rubric = "video",
        max_turns: int = 5,
        **kwargs: Any,
    ):
        bad = set(question_types) - set(QUESTION_TYPES)
        if bad or not question_types:
            raise ValueError(f"question_types must be a non-empty subset of {QUESTION_TYPES}, got {question_types}")
        if overview_frames < 1 or overview_size < 16:
            raise ValueError(f"overview_frames must be >= 1 and overview_size >= 16, got {overview_frames}, {overview_size}")
        if num_videos is not None and num_videos < 1:
            raise ValueError(f"num_videos must be >= 1 or None, got {num_videos}")
        if cache_max_mb is not None and not (math.isfinite(cache_max_mb) and cache_max_mb > 0):
            raise ValueError(f"cache_max_mb must be a positive number of MB or None (unbounded), got {cache_max_mb}")
        if not 0 < tiou_threshold <= 1:
            raise ValueError(f"tiou_threshold must be in (0, 1], got {tiou_threshold}")
        self.scene = SceneConfig(int(video_size[0]), int(video_size[1]), int(video_fps), (int(duration[0]), int(duration[1])), float(sign_frac), str(sign_symbols))
        env_cache = None if cache_dir is None else Path(cache_dir).expanduser()
        self.cache_dir = env_cache or default_cache_dir()
        self.cache_max_bytes = None if cache_max_mb is None else int(cache_max_mb * 2**20)
        self.backend = backend
        self.num_videos = num_videos
        self.question_types = tuple(question_types)
        self.overview_frames, self.overview_size = int(overview_frames), int(overview_size)
        self._crop_args = dict(fps=crop_fps, max_frames=crop_frames, max_side=crop_size, min_span=min_span, max_span=max_span, repeat_iou=repeat_iou)
        self.get_frames_max, self.zoom_size = int(get_frames_max), int(zoom_size)
        self.tiou_threshold = float(tiou_threshold)
        self.crop_reward = float(crop_reward)
        self.rows: list[_Row] | None = None
        self.load_report = LoadReport()
        if dataset is not None:
            self.rows, self.load_report = video_rows(dataset, root, backend)
        self._bad_rows: set[int] = set()
        self._source: VideoSource | None = None
        self._spec: VideoSpec | None = None  # the procedural video of this episode
        if isinstance(rubric, str) and rubric == "video":
            rubric = video_rubric(crop_tiou)
        super().__init__(max_turns=max_turns, rubric=rubric, **kwargs)

    # ---------------------------------------------------------------- tasks
    def num_tasks(self) -> int | None:
        return len(self.rows) if self.rows is not None else None

    def sample_task(self, rng: np.random.Generator, index: int | None) -> VideoTask:
        if self.rows is not None:
            start = int(rng.integers(len(self.rows))) if index is None else index
            return self._dataset_task(rng, start)
        if index is not None:  # evaluation task i: its own fixed stream, independent of the env seed
            return self._procedural_task(np.random.default_rng([index, _TASK_SALT]), f"video-{index}")
        return self._procedural_task(rng, f"video-r{int(rng.integers(2**31))}")

    def _open(self, path: Path) -> VideoSource:
        if self._source is not None:
            self._source.close()
            self._source = None
        self._source = VideoSource(path, backend=self.backend)
        return self._source

    def _procedural_task(self, rng: np.random.Generator, task_id: str) -> VideoTask:
        seed = int(rng.integers(self.num_videos)) if self.num_videos else int(rng.integers(2**31))
        spec = make_spec(seed, self.scene)
        self._spec = spec
        path = ensure_video(spec, self.cache_dir, max_bytes=self.cache_max_bytes)
        qtype_name = self.question_types[int(rng.integers(len(self.question_types)))]
        q = _procedural_question(spec, qtype_name, rng)
        try:
            return self._make_task(task_id, self._open(path), *q)
        except VideoError as e:  # a damaged cache file (e.g. a killed writer): render it again
            log.warning("cached video %s is unreadable (%s); rendering it again", path.name, e)
            path.unlink(missing_ok=True)
            return self._make_task(task_id, self._open(ensure_video(spec, self.cache_dir, max_bytes=self.cache_max_bytes)), *q)

    def _dataset_task(self, rng: np.random.Generator, start: int) -> VideoTask:
        n = len(self.rows)
        for k in range(n):
            i = (start + k) % n
            if i in self._bad_rows:
                continue
            row = self.rows[i]
            self._spec = None
            try:
                src = self._open(row.path)
                order = rng.permutation(len(row.options)) if row.options else np.arange(0)
                options = tuple(row.options[j] for j in order)
                correct = int(np.where(order == row.correct)[0][0]) if row.options else -1
                return self._make_task(f"video-{row.row_id}", src, row.qtype, row.question, options, correct, row.answers, row.span)
            except VideoError as e:  # changed or truncated since loading: skip and count, go on
                self._bad_rows.add(i)
                self.load_report.skipped["decode"] += 1
                warnings.warn(f"video dataset: skipping row {row.row_id} ({e}); {len(self._bad_rows)} skipped at run time", stacklevel=2)
        raise DatasetError(f"every row of the video dataset failed to decode ({n} rows)")

    def _make_task(self, task_id: str, src: VideoSource, qtype: str, question: str, options: tuple[str, ...], correct: int, answers: tuple[str, ...], span: tuple[float, float] | None) -> VideoTask:
        d = src.duration
        got = src.read([(k + 0.5) * d / self.overview_frames for k in range(self.overview_frames)])
        frames = tuple(draw_timestamp(resize_max_side(f, self.overview_size), t) for t, f in got)
        times = tuple(float(t) for t, _ in got)
        if qtype == "choice":
            how = "Reply with the option letter, e.g. <answer>A</answer>."
            question = question + "\nOptions: " + " ".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
        elif qtype == "grounding":
            how = "Reply with the span in seconds, e.g. <answer>[12.5, 16.0]</answer>."
        else:
            how = "Reply with a short answer, e.g. <answer>word</answer>."
        prompt = (
            f"<video>\nAn overview of a {d:.1f} s video ({src.width}x{src.height} px) at low resolution: "
            f"{len(frames)} frames at {', '.join(format_time(t) for t in times)}.\n{question}\n"
            "Look closer with crop_video(start_time, end_time), get_frames(times) or zoom_frame(time, bbox) "
            f"before you answer. {how}"
        )
        return VideoTask(
            task_id=task_id, prompt=prompt, frames=frames, frame_times=times, path=str(src.path), qtype=qtype,
            question=question, options=options, correct=correct, answers=answers, span=span,
            duration=d, width=src.width, height=src.height,
        )

    # ---------------------------------------------------------------- tools & rewards
    def make_tools(self) -> list:
        return [CropVideoTool(**self._crop_args), GetFramesTool(max_times=self.get_frames_max), ZoomFrameTool(max_side=self.zoom_size)]

    def tool_state(self, task: VideoTask) -> VideoToolState:
        return VideoToolState(reader=self._source)

    def turn_terms(self, calls: list[ToolCall], results: list[ToolResult]) -> dict[str, float]:
        crops = [r for c, r in zip(calls, results) if c.name == "crop_video" and r.error is None]
        if not crops or self.task.span is None:
            return {}
        last = self._state.spans[-1]
        hit = any(temporal_iou(s, self.task.span) > 0 for s in self._state.spans[-len(crops):])
        self._metrics["last_crop_tiou"] = temporal_iou(last, self.task.span)
        first_hit = hit and not self._metrics.get("crop_hit", 0.0)
        if hit:
            self._metrics["crop_hit"] = 1.0
        return {"crop": self.crop_reward} if first_hit and self.crop_reward > 0 else {}

    def verify(self, task: VideoTask, answer: str) -> Verdict:
        if task.qtype == "choice":
            return Verdict(choice_match(answer, task.options, task.correct), {"answer_tiou": 0.0})
        if task.qtype == "open":
            return Verdict(_open_match(answer, task.answers), {"answer_tiou": 0.0})
        span = parse_span(answer)
        tiou = temporal_iou(span, task.span) if span is not None and task.span is not None else 0.0
        return Verdict(float(tiou >= self.tiou_threshold), {"answer_tiou": tiou})

    def close(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None
        super().close()

    # ---------------------------------------------------------------- scripted
    def oracle_crop(self) -> tuple[float, float] | None:
        """A valid ``crop_video`` span around the gt segment (``None`` without one)."""
        if self.task.span is None:
            return None
        tool: CropVideoTool = self.tools["crop_video"]
        d = self.task.duration
        s, e = max(0.0, self.task.span[0] - 0.5), min(d, self.task.span[1] + 0.5)
        longest = min(max(tool.min_span, d / 2), tool.max_span)
        if e - s > longest:  # keep the centre
            c = (s + e) / 2
            s, e = c - longest / 2, c + longest / 2
        if e - s < tool.min_span:
            s, e = max(0.0, min(s, d - tool.min_span)), min(d, max(s, 0.0) + tool.min_span)
        return round(s, 3), round(e, 3)

    def oracle_answer(self) -> str:
        t = self.task
        if t.qtype == "choice":
            return LETTERS[t.correct]
        if t.qtype == "open":
            return t.answers[0]
        return f"[{t.span[0]:.3f}, {t.span[1]:.3f}]"

    def oracle_action(self) -> str:
        crop = self.oracle_crop()
        if crop is not None and not self._state.spans and self._turn < self.max_turns - 1:
            if not isinstance(self.tools["crop_video"].check_span(*crop, self.task.duration, []), str):
                return self.parser.format_call(ToolCall("crop_video", {"start_time": crop[0], "end_time": crop[1]}))
        return self.parser.format_answer(self.oracle_answer())


def _open_match(answer: str, refs: tuple[str, ...]) -> float:
    """``exact_match``, plus a literal case-insensitive match: normalisation drops the
    article "a", which would make the letter A unanswerable."""
    a = answer.strip().strip(".!").strip().casefold()
    return max(exact_match(answer, refs), float(any(a == r.strip().casefold() for r in refs)))


def _procedural_question(spec: VideoSpec, name: str, rng: np.random.Generator) -> tuple:
    """``(qtype, question, options, correct, answers, span)`` for question kind ``name``."""
    if name == "collision_span":
        a, b = spec.pair
        tc = spec.collision_time
        span = (max(0.0, tc - 1.0), min(float(spec.duration), tc + 1.0))
        q = f"When do the {a.colour} {a.shape} and the {b.colour} {b.shape} touch? Give [start, end] in seconds."
        return "grounding", q, (), -1, (), span
    sign = spec.signs[int(rng.integers(len(spec.signs)))]
    span = (sign.start, sign.end)
    striped = spec.config.symbols == "stripes"
    if name == "sign_span":
        shows = f"{sign.letter} stripes" if striped else f"the letter {sign.letter}"
        q = f"A few small signs appear one at a time. When is the sign showing {shows} visible? Give [start, end] in seconds."
        return "grounding", q, (), -1, (), span
    what = "stripe pattern" if striped else "letter"
    q = f"A small {sign.colour} sign appears for a few seconds. Which {what} does it show?"
    if name == "letter_open":
        how = " Answer with the pattern (" + ", ".join(STRIPES) + ")." if striped else " Answer with the letter."
        return "open", q + how, (), -1, (sign.letter,), span
    others = [c for c in symbol_set(spec.config) if c != sign.letter]
    opts = [sign.letter] + [others[i] for i in rng.permutation(len(others))[:3]]
    order = rng.permutation(4)
    options = tuple(opts[i] for i in order)
    return "choice", q, options, int(np.where(order == 0)[0][0]), (), span


# ---------------------------------------------------------------------- baselines
def random_agent(env: VideoFramesEnv, rng: np.random.Generator) -> str:
    """A random reply: a tool call with random (often invalid) arguments, or a random answer."""
    env = getattr(env, "unwrapped", env)
    d = float(env.task.duration)
    k = int(rng.integers(5))
    if k == 0:
        s = float(rng.uniform(-2, d + 2))
        call = ToolCall("crop_video", {"start_time": round(s, 2), "end_time": round(s + float(rng.uniform(-2, d / 2)), 2)})
    elif k == 1:
        call = ToolCall("get_frames", {"times": [round(float(t), 2) for t in rng.uniform(-1, d + 1, size=int(rng.integers(1, 4)))]})
    elif k == 2:
        x, y = float(rng.uniform(0, env.task.width)), float(rng.uniform(0, env.task.height))
        call = ToolCall("zoom_frame", {"time": round(float(rng.uniform(0, d)), 2), "bbox": [round(x), round(y), round(x + 40), round(y + 40)]})
    else:
        return env.parser.format_answer(_guess(env, rng))
    return env.parser.format_call(call)


def overview_agent(env: VideoFramesEnv, rng: np.random.Generator) -> str:
    """Answers at once from the first observation alone (question, options, overview
    timestamps), without tools and without reading ground truth: the chance baseline."""
    env = getattr(env, "unwrapped", env)
    return env.parser.format_answer(_guess(env, rng))


def overview_reader_agent(env: VideoFramesEnv, rng: np.random.Generator) -> str:
    """A generous overview-only baseline: for letter questions it is told where the sign
    is (ground truth) and template-matches every candidate letter, rendered in the plain
    style and downsampled like the overview, against the overview frames that show the
    sign; otherwise it answers like ``overview_agent``. It bounds what the overview
    pixels alone can give."""
    env = getattr(env, "unwrapped", env)
    spec, t = env._spec, env.task
    if spec is not None and t.qtype in ("choice", "open") and t.span is not None:
        sign = next((s for s in spec.signs if (s.start, s.end) == tuple(t.span)), None)
        cands = list(t.options) if t.qtype == "choice" else list(symbol_set(spec.config))
        best = _read_sign_in_overview(env, spec, sign, cands) if sign is not None else None
        if best is not None:
            return env.parser.format_answer(LETTERS[cands.index(best)] if t.qtype == "choice" else best)
    return env.parser.format_answer(_guess(env, rng))


def _read_sign_in_overview(env: VideoFramesEnv, spec: VideoSpec, sign: Any, candidates: list[str]) -> str | None:
    """The candidate letter whose downsampled rendering best matches the overview frames
    that show ``sign`` (normalised L2 over the board's interior); ``None`` if none shows it."""
    t = env.task
    shown = [f for f, ft in zip(t.frames, t.frame_times) if sign.start <= ft < sign.end]
    if not shown or not candidates:
        return None
    w, h = spec.config.width, spec.config.height
    scale = shown[0].shape[1] / w
    half = sign.side / 2 * 0.8 * scale
    cx, cy = sign.cx * scale, sign.cy * scale
    box = (slice(max(0, int(cy - half)), int(math.ceil(cy + half))), slice(max(0, int(cx - half)), int(math.ceil(cx + half))))
    scores = []
    for c in candidates:
        canvas = np.full((h, w, 3), 60, np.uint8)
        draw_sign(canvas, replace(sign, letter=c, font=0, dx=0.0, dy=0.0))  # the style is unknown: use the plain one
        tmpl = resize_max_side(canvas, env.overview_size)[box].astype(np.float32)
        err = 0.0
        for f in shown:
            patch = f[box].astype(np.float32)
            err += float((((patch - patch.mean()) - (tmpl - tmpl.mean())) ** 2).mean())
        scores.append(err)
    return candidates[int(np.argmin(scores))]


def _guess(env: VideoFramesEnv, rng: np.random.Generator) -> str:
    t = env.task
    if t.qtype == "choice":
        return LETTERS[int(rng.integers(len(t.options)))]
    if t.qtype == "open":
        return str(rng.choice(list(symbol_set(env._spec.config) if env._spec is not None else SIGN_LETTERS)))
    c = float(t.frame_times[int(rng.integers(len(t.frame_times)))]) if t.frame_times else t.duration / 2
    return f"[{max(0.0, c - 1.5):.1f}, {min(t.duration, c + 1.5):.1f}]"
