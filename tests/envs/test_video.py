"""Tests of ``mmgym/VideoFrames-v0`` (LOVE-R1 / LongVT / VITAL video frame tools).

Small videos (160x120, 4 fps, 20-30 s, a pool of 6 seeds) in a per-session tmp cache
keep the whole file well under a minute on 2 cores.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmgym  # noqa: F401
from mmgym.envs.checker import check_mm_env
from mmgym.envs.datasets import DatasetError
from mmgym.envs.video import VideoFramesEnv, overview_agent, overview_reader_agent, random_agent
from mmgym.envs.video_io import VideoError, VideoSource, decord_available, probe_video
from mmgym.envs.video_scenes import SceneConfig, ensure_video, make_spec

SMALL = dict(video_size=(160, 120), video_fps=4, duration=(20, 30), num_videos=6, overview_frames=8, overview_size=64, crop_size=128)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("videos")


@pytest.fixture(scope="module")
def env(cache: Path) -> VideoFramesEnv:
    return gym.make("mmgym/VideoFrames-v0", cache_dir=str(cache), **SMALL).unwrapped


def call(name: str, **args: object) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": args}) + "</tool_call>"


def play(env: VideoFramesEnv, agent, n: int, start: int = 0) -> float:
    wins = []
    for i in range(start, start + n):
        env.reset(seed=i, options={"task_index": i})
        rng = np.random.default_rng(i)
        while True:
            _, _, term, trunc, info = env.step(env.oracle_action() if agent is None else agent(env, rng))
            if term or trunc:
                wins.append(info["success"])
                break
    return float(np.mean(wins))


# ------------------------------------------------------------------ contract
def test_check_env_and_check_mm_env(env: VideoFramesEnv) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=UserWarning)
        check_env(env, skip_render_check=True)
    check_mm_env(env)


def test_first_observation(env: VideoFramesEnv) -> None:
    obs, info = env.reset(seed=1)
    assert obs["text"].startswith("<video>") and obs["images"] == () and obs["source"] == 0
    assert len(obs["frames"]) == len(obs["frame_times"]) == 8
    assert all(max(f.shape[:2]) == 64 for f in obs["frames"])
    times = [float(t) for t in obs["frame_times"]]
    assert times == sorted(times) and 0 <= times[0] and times[-1] <= env.task.duration
    assert {s["function"]["name"] for s in info["tool_schemas"]} == {"crop_video", "get_frames", "zoom_frame"}
    # the timestamp is drawn in the top-left corner: dark box with bright text
    assert obs["frames"][0][:6, :6].mean() < obs["frames"][0][:10, :20].max()


# ------------------------------------------------------------------ tools, hand-checked
def test_crop_video_rate_size_and_repeat(env: VideoFramesEnv) -> None:
    env.reset(seed=2)
    obs, r, term, trunc, info = env.step(call("crop_video", start_time=2, end_time=6))
    assert not info["tool_errors"] and obs["source"] == 1 and "<video>" in obs["text"]
    # 4 s at 2 fps = 8 frames at centres 2.25, 2.75, ... snapped to the 4 fps grid
    assert [float(t) for t in obs["frame_times"]] == [2.25, 2.75, 3.25, 3.75, 4.25, 4.75, 5.25, 5.75]
    assert all(max(f.shape[:2]) == 128 for f in obs["frames"])
    obs, *_, info = env.step(call("crop_video", start_time=2.2, end_time=6))
    assert "repeats the span [2, 6]" in obs["text"] and info["tool_errors"] and obs["frames"] == ()


@pytest.mark.parametrize(
    "args, message",
    [
        ({"start_time": -3, "end_time": 2}, "outside the video"),
        ({"start_time": 5, "end_time": 1e9}, "outside the video"),
        ({"start_time": 8, "end_time": 4}, "reversed"),
        ({"start_time": 4, "end_time": 4.5}, "at least 1 s"),
        ({"start_time": 0, "end_time": 19}, "at most"),
        ({"start_time": "3", "end_time": 5}, "is not of type 'number'"),
        ({"start_time": 1}, "required"),
        ({"start_time": 1, "end_time": 3, "fps": 9}, "Additional properties"),
    ],
)
def test_crop_video_bad_arguments_are_tool_errors(env: VideoFramesEnv, args: dict, message: str) -> None:
    env.reset(seed=3)
    obs, r, term, trunc, info = env.step(call("crop_video", **args))
    assert obs["source"] == 1 and message in obs["text"] and info["tool_errors"] and not (term or trunc)


def test_nan_and_huge_numbers_are_tool_errors(env: VideoFramesEnv) -> None:
    env.reset(seed=3)
    raw = '<tool_call>{"name": "crop_video", "arguments": {"start_time": NaN, "end_time": 3}}</tool_call>'
    assert "NaN" in env.step(raw)[0]["text"]
    raw = '<tool_call>{"name": "get_frames", "arguments": {"times": [1' + "0" * 400 + "]}}</tool_call>"
    obs, *_, info = env.step(raw)
    assert info["tool_errors"] and "number" in obs["text"]


def test_get_frames_and_zoom_frame(env: VideoFramesEnv) -> None:
    env.reset(seed=4)
    obs, *_, info = env.step(call("get_frames", times=[0, 1.05, 1.1, 19]))
    assert not info["tool_errors"]
    # 1.05 and 1.1 both snap to the frame at 1.0 s (4 fps): duplicates merged
    assert [float(t) for t in obs["frame_times"]] == [0.0, 1.0, 19.0]
    assert obs["frames"][0].shape == (120, 160, 3)
    obs, *_, info = env.step(call("zoom_frame", time=3, bbox=[10, 10, 50, 40]))
    assert not info["tool_errors"] and len(obs["images"]) == 1 and obs["text"].count("<image>") == 1
    assert max(obs["images"][0].shape[:2]) >= 80
    obs, *_, info = env.step(call("zoom_frame", time=3, bbox=[500, 500, 600, 600]))
    assert "outside the image" in obs["text"]


# ------------------------------------------------------------------ rewards and answers
def test_grounding_answer_scores_tiou(cache: Path) -> None:
    env = VideoFramesEnv(cache_dir=str(cache), **{**SMALL, "question_types": ("collision_span",)})
    env.reset(seed=0, options={"task_index": 0})
    s, e = env.task.span
    _, r, term, _, info = env.step(f"<answer>[{s + 1}, {e + 1}]</answer>")  # 2 s gt span shifted by 1 s: IoU 1/3
    assert term and info["metrics"]["answer_tiou"] == pytest.approx(1 / 3) and info["success"] is False
    assert info["reward_terms"] == pytest.approx({"accuracy": 0.0, "format": 0.1, "answer_tiou": 1 / 3})
    env.close()


def test_longvt_rubric_scores_last_crop(cache: Path) -> None:
    env = VideoFramesEnv(cache_dir=str(cache), rubric="longvt", **SMALL)
    env.reset(seed=0, options={"task_index": 5})
    env.step(env.oracle_action())
    _, r, term, _, info = env.step(env.oracle_action())
    gt, crop = env.task.span, env._state.spans[-1]
    expected = (min(gt[1], crop[1]) - max(gt[0], crop[0])) / (max(gt[1], crop[1]) - min(gt[0], crop[0]))
    assert info["reward_terms"]["crop_tiou"] == pytest.approx(expected) and r == pytest.approx(2 + expected)


def test_open_letter_a_is_answerable() -> None:
    from mmgym.envs.video import _open_match

    assert _open_match("A", ("A",)) == 1.0 and _open_match(" a. ", ("A",)) == 1.0 and _open_match("B", ("A",)) == 0.0


def test_crop_reward_paid_once(cache: Path) -> None:
    env = VideoFramesEnv(cache_dir=str(cache), crop_reward=0.5, **SMALL)
    env.reset(seed=0, options={"task_index": 1})
    _, r, *_ = env.step(env.oracle_action())
    s, e = env.task.span
    _, r2, *_ = env.step(call("crop_video", start_time=max(0, s - 3), end_time=min(env.task.duration, e + 3)))
    assert r == pytest.approx(0.5) and r2 == 0.0


# ------------------------------------------------------------------ baselines
def test_oracle_solves_and_overview_does_not(env: VideoFramesEnv) -> None:
    assert play(env, None, 24) >= 0.95
    assert play(env, overview_agent, 40, start=100) < 0.4
    reader = VideoFramesEnv(cache_dir=env.cache_dir, **{**SMALL, "question_types": ("letter_choice",)})
    assert play(reader, overview_reader_agent, 30, start=200) < 0.7  # 4 options, generous matcher
    assert play(env, random_agent, 20, start=300) < 0.5


def test_striped_signs_ask_for_the_pattern_and_show_it_once_cropped(cache: Path) -> None:
    from mmgym.envs.scenes import STRIPES
    from mmgym.envs.video_scenes import Sign, SceneConfig, draw_sign

    env = VideoFramesEnv(cache_dir=str(cache), **{**SMALL, "sign_symbols": "stripes", "sign_frac": 0.15,
                                                  "question_types": ("letter_choice", "letter_open", "sign_span")})
    kinds = set()
    for i in range(12):
        env.reset(options={"task_index": i})
        t = env.task
        assert all(s.letter in STRIPES for s in env._spec.signs)
        if t.qtype == "choice":
            assert "Which stripe pattern" in t.question and sorted(t.options) == sorted(STRIPES)
        elif t.qtype == "open":
            assert "Which stripe pattern" in t.question and t.answers[0] in STRIPES
        else:
            assert " stripes visible?" in t.question
        kinds.add(t.qtype)
    assert kinds == {"choice", "open", "grounding"}
    assert play(env, None, 12) >= 0.95
    assert SceneConfig(symbols="stripes").key() != SceneConfig().key()
    with pytest.raises(ValueError, match="symbols"):
        VideoFramesEnv(cache_dir=str(cache), **{**SMALL, "sign_symbols": "glyphs"})
    # the board's interior holds the pattern: horizontal stripes are constant along a row
    img = np.zeros((60, 60, 3), np.uint8)
    draw_sign(img, Sign("horizontal", "red", 30.0, 30.0, 40.0, 0.0, 1.0))
    inner = img[20:40, 20:40, 0].astype(int)
    assert (inner.max(1) - inner.min(1)).max() == 0 and inner.max() - inner.min() > 100


# ------------------------------------------------------------------ determinism
def test_seeded_determinism(cache: Path) -> None:
    def trace(seed: int) -> list:
        e = VideoFramesEnv(cache_dir=str(cache), **SMALL)
        obs, info = e.reset(seed=seed)
        out = [info["task_id"], obs["text"], [f.tobytes() for f in obs["frames"]]]
        rng = np.random.default_rng(seed)
        for _ in range(3):
            obs, r, term, trunc, info = e.step(random_agent(e, rng))
            out += [obs["text"], r, [f.tobytes() for f in obs["frames"]], [i.tobytes() for i in obs["images"]]]
            if term or trunc:
                break
        return out

    assert trace(7) == trace(7)
    assert trace(7)[1] != trace(8)[1] or trace(7)[0] != trace(8)[0]


# ------------------------------------------------------------------ fuzzing
_num = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**30), 10**30), st.text(max_size=4), st.none())
_calls = st.builds(
    lambda name, args: "<tool_call>" + json.dumps({"name": name, "arguments": args}) + "</tool_call>",
    st.sampled_from(["crop_video", "get_frames", "zoom_frame", "nope"]),
    st.dictionaries(st.sampled_from(["start_time", "end_time", "times", "time", "bbox", "x"]), st.one_of(_num, st.lists(_num, max_size=6)), max_size=4),
)
_text = st.one_of(
    _calls,
    _calls.map(lambda s: s[: len(s) // 2]),  # truncated JSON
    st.text(max_size=200),
    st.builds(lambda a, b: f"<answer>{a}<tool_call>{b}</answer>", st.text(max_size=30), st.text(max_size=30)),
    st.builds(lambda a: f"<answer>[{a}, {a}]</answer>", _num),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=st.lists(_text, min_size=1, max_size=3))
def test_fuzzed_actions_never_raise(env: VideoFramesEnv, actions: list[str]) -> None:
    obs, _ = env.reset(seed=11)
    for a in actions:
        obs, r, term, trunc, info = env.step(a)
        assert env.observation_space.contains(obs) and math.isfinite(r)
        assert obs["text"].count("<image>") == len(obs["images"]) and len(obs["frames"]) == len(obs["frame_times"])
        if term or trunc:
            break


# ------------------------------------------------------------------ video I/O and datasets
def _video(cache: Path, seed: int = 0) -> Path:
    return ensure_video(make_spec(seed, SceneConfig(160, 120, 4, (20, 20))), cache)


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_backends_agree_and_cache(cache: Path, backend: str) -> None:
    if backend == "decord" and not decord_available():
        pytest.skip("decord not installed")
    path = _video(cache)
    with VideoSource(path, backend=backend) as src, VideoSource(path, backend="pyav") as ref:
        assert src.decoder_name == backend and src.meta == ref.meta and src.duration == 20.0
        a = src.read([0.0, 7.3, 19.9])
        b = ref.read([0.0, 7.3, 19.9])
        assert [t for t, _ in a] == [0.0, 7.25, 19.75]
        assert all(np.abs(x.astype(int) - y.astype(int)).mean() < 2 for (_, x), (_, y) in zip(a, b))
        src.read([7.25, 8.0])
        assert src.hits == 1 and src.misses == 4


def test_corrupt_truncated_missing_videos_are_skipped(cache: Path, tmp_path: Path) -> None:
    good = _video(cache)
    (tmp_path / "good.mp4").write_bytes(good.read_bytes())
    (tmp_path / "trunc.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 100)
    rows = [
        {"video": "good.mp4", "question": "Which?", "options": ["x", "y"], "answer": "B", "span": [1, 3]},
        {"video": "good.mp4", "question": "When?", "type": "grounding", "span": [2, 5]},
        {"video": "good.mp4", "question": "Say", "answer": "yes"},
        {"video": "trunc.mp4", "question": "Say", "answer": "yes"},
        {"video": "junk.mp4", "question": "Say", "answer": "yes"},
        {"video": "missing.mp4", "question": "Say", "answer": "yes"},
        {"video": "../good.mp4", "question": "Say", "answer": "yes"},
        {"video": "good.mp4", "question": "Say"},
    ]
    jl = tmp_path / "qa.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    with pytest.warns(UserWarning, match="skipped 6 bad row"):
        env = VideoFramesEnv(dataset=str(jl), overview_frames=4)
    assert env.num_tasks() == 3 and env.load_report.num_skipped == 6
    kinds = {env.rows[i].qtype for i in range(3)}
    assert kinds == {"choice", "grounding", "open"}
    for i in range(3):
        env.reset(seed=0, options={"task_index": i})
        _, _, term, _, info = env.step(env.oracle_action())
        if not term:
            _, _, term, _, info = env.step(env.oracle_action())
        assert info["success"], i
    # a file that breaks after loading: that row is skipped and counted, the run goes on
    (tmp_path / "good.mp4").write_bytes(b"gone")
    with pytest.warns(UserWarning, match="skipping row"), pytest.raises(DatasetError, match="every row"):
        env.reset(seed=0, options={"task_index": 0})
    assert env.load_report.skipped["decode"] == 3


def test_probe_rejects_truncated(cache: Path, tmp_path: Path) -> None:
    good = _video(cache)
    bad = tmp_path / "t.mp4"
    bad.write_bytes(good.read_bytes()[: int(good.stat().st_size * 0.6)])
    with pytest.raises(VideoError):
        probe_video(bad, "pyav")
    assert probe_video(good, "pyav").num_frames == 80


def test_long_video_is_never_decoded_whole(cache: Path) -> None:
    path = ensure_video(make_spec(1, SceneConfig(64, 48, 4, (600, 600))), cache)  # a 10-minute video
    with VideoSource(path, backend="pyav", max_decode=200) as src:
        assert src.meta.num_frames == 2400
        src.read([(k + 0.5) * 600 / 16 for k in range(16)])  # overview: 16 seeks, few frames each
        assert src.misses == 16


# ------------------------------------------------------------------ cache bound
def test_video_cache_is_an_lru_bounded_by_size(tmp_path: Path) -> None:
    import os

    from mmgym.envs.video_scenes import prune_cache

    cfg = SceneConfig(160, 120, 4, (20, 20))
    paths = [ensure_video(make_spec(s, cfg), tmp_path) for s in range(4)]
    sizes = [p.stat().st_size for p in paths]
    for k, p in enumerate(paths):  # distinct, increasing use times
        os.utime(p, (1000.0 + k, 1000.0 + k))
    ensure_video(make_spec(0, cfg), tmp_path)  # a cache hit: video 0 becomes the most recently used
    bound = sum(sizes) - 1  # one of the four must go: the least recently used, video 1
    assert prune_cache(tmp_path, bound) == 1
    assert [p.exists() for p in paths] == [True, False, True, True]
    # through the env: a bound of ~2 videos keeps the folder near it, and episodes still run
    env = VideoFramesEnv(cache_dir=str(tmp_path), cache_max_mb=2.2 * max(sizes) / 2**20, **{**SMALL, "duration": (20, 20), "num_videos": None})
    for seed in range(5):
        obs, info = env.reset(seed=seed)
        assert len(obs["frames"]) == SMALL["overview_frames"]
    mp4s = list(tmp_path.glob("*.mp4"))
    assert 1 <= len(mp4s) <= 3 and sum(p.stat().st_size for p in mp4s) <= 2.2 * max(sizes) + max(sizes)
    with pytest.raises(ValueError, match="cache_max_mb"):
        VideoFramesEnv(cache_dir=str(tmp_path), cache_max_mb=0, **SMALL)
