"""Video I/O throughput for ``mmgym/VideoFrames-v0``.

1. Decoded frames/s of ``crop_video`` with decord and with PyAV on the same generated
   MP4 files (a fresh ``VideoSource`` per call, so every frame is a cache miss).
2. The frame-cache hit ratio over an episode: overview, ``crop_video`` of the gt span,
   ``get_frames`` inside it, ``zoom_frame`` on one of those frames, answer.

3. With ``--baselines N``: success of the oracle and the scripted baselines on N tasks.

Run: ``python benchmarks/video.py [--videos 4] [--crops 12] [--episodes 20] [--baselines 200]``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from mmgym.envs.video import VideoFramesEnv
from mmgym.envs.video_io import VideoSource, decord_available
from mmgym.envs.video_scenes import SceneConfig, ensure_video, make_spec
from mmgym.tools.video import CropVideoTool, VideoToolState

log = logging.getLogger("benchmarks.video")


def crop_throughput(paths: list[Path], backend: str, crops: int, seed: int = 0) -> tuple[float, int, float]:
    """``(frames/s, frames decoded, seconds)`` over ``crops`` random 8 s crops per file."""
    tool = CropVideoTool()
    rng = np.random.default_rng(seed)
    frames, seconds = 0, 0.0
    for path in paths:
        for _ in range(crops):
            t0 = time.perf_counter()
            with VideoSource(path, backend=backend) as src:
                s = float(rng.uniform(0, src.duration - 8))
                res = tool(VideoToolState(src, draw_times=False), s, s + 8)
                assert res.error is None, res.error
                frames += src.misses
            seconds += time.perf_counter() - t0
    return frames / seconds, frames, seconds


def episode_hit_ratio(cache_dir: Path, backend: str, episodes: int) -> tuple[float, int, int]:
    """Cache hits / look-ups summed over ``episodes`` looking-around episodes."""
    env = VideoFramesEnv(cache_dir=str(cache_dir), backend=backend, num_videos=4)  # type: ignore[arg-type]
    hits = misses = 0
    for i in range(episodes):
        env.reset(seed=i, options={"task_index": i})
        env.step(env.oracle_action())  # crop_video around the gt span
        s, e = env.task.span
        times = [round(float(t), 2) for t in np.linspace(s, e, 4)]
        env.step(f'<tool_call>{{"name": "get_frames", "arguments": {{"times": {times}}}}}</tool_call>')
        env.step(f'<tool_call>{{"name": "zoom_frame", "arguments": {{"time": {times[1]}, "bbox": [40, 30, 200, 150]}}}}</tool_call>')
        env.step(env.oracle_action())
        hits += env._source.hits
        misses += env._source.misses
    env.close()
    return hits / max(1, hits + misses), hits, misses


def baselines(cache_dir: Path, episodes: int) -> None:
    """Success of the oracle and the scripted baselines on evaluation tasks 0..episodes-1."""
    from mmgym.envs.video import overview_agent, overview_reader_agent, random_agent

    env = VideoFramesEnv(cache_dir=str(cache_dir))
    for name, agent in [("oracle", None), ("overview", overview_agent), ("overview_reader", overview_reader_agent), ("random", random_agent)]:
        wins: dict[str, list[bool]] = {}
        for i in range(episodes):
            env.reset(seed=i, options={"task_index": i})
            rng = np.random.default_rng(i)
            while True:
                _, _, term, trunc, info = env.step(env.oracle_action() if agent is None else agent(env, rng))
                if term or trunc:
                    break
            kind = env.task.qtype + ("/collision" if "touch" in env.task.question else "/sign")
            wins.setdefault(kind, []).append(bool(info["success"]))
        total = np.mean([w for v in wins.values() for w in v])
        per = ", ".join(f"{k} {np.mean(v):.3f} (n={len(v)})" for k, v in sorted(wins.items()))
        log.info("%-15s success %.3f over %d episodes: %s", name, total, episodes, per)
    env.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--crops", type=int, default=12)
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--cache-dir", type=str, default=None, help="default: a temporary folder")
    ap.add_argument("--baselines", type=int, default=0, help="also play N evaluation tasks with the oracle and baselines")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tmp = tempfile.TemporaryDirectory() if args.cache_dir is None else None
    cache = Path(args.cache_dir or tmp.name)
    cfg = SceneConfig()
    t0 = time.perf_counter()
    paths = [ensure_video(make_spec(s, cfg), cache) for s in range(args.videos)]
    log.info("generated %d videos (%dx%d, %d fps, %d-%d s) in %.2f s", len(paths), cfg.width, cfg.height, cfg.fps, *cfg.duration, time.perf_counter() - t0)
    backends = ["pyav"] + (["decord"] if decord_available() else [])
    if "decord" not in backends:
        log.info("decord is not installed (pip install 'mmgym[video]'): PyAV only")
    for b in backends:
        fps, n, sec = crop_throughput(paths, b, args.crops)
        log.info("crop_video %-6s: %7.1f decoded frames/s (%d frames in %.2f s, incl. opening the file)", b, fps, n, sec)
    for b in backends:
        ratio, h, m = episode_hit_ratio(cache, b, args.episodes)
        log.info("episode cache %-6s: hit ratio %.3f (%d hits, %d misses over %d episodes)", b, ratio, h, m, args.episodes)
    if args.baselines:
        baselines(cache, args.baselines)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
