"""Zoom steps per second of ChainOfFocus vs a raw OpenCV crop+resize of the same boxes.

Run: python benchmarks/env_step.py [--steps 2000]
Goal (issue 2): an env zoom step costs at most 1.3x the raw operation.
"""

from __future__ import annotations

import argparse
import json
import time

import cv2
import gymnasium as gym
import numpy as np

import mmgym  # noqa: F401
from mmgym.tools import resize_max_side


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--zoom", default="bbox", choices=["bbox", "region"])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    env = gym.make("mmgym/ChainOfFocus-v0", zoom=args.zoom, max_turns=10**6).unwrapped
    env.reset(seed=0)
    img = env.task.image
    h, w = img.shape[:2]
    rng = np.random.default_rng(0)
    boxes = []
    for _ in range(args.steps):  # large crops (the expensive, realistic case) resized to the view size
        bw, bh = int(rng.integers(200, w // 2)), int(rng.integers(200, h // 2))
        x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        boxes.append((x, y, x + bw, y + bh))
    if args.zoom == "bbox":
        actions = ['<tool_call>{"name": "zoom", "arguments": {"bbox": [%d, %d, %d, %d]}}</tool_call>' % b for b in boxes]
        crops = boxes
    else:
        tool = env.tools["zoom"]
        ks = [int(rng.integers(1, env.grid**2 + 1)) for _ in range(args.steps)]
        actions = ['<tool_call>{"name": "zoom", "arguments": {"region": %d}}</tool_call>' % k for k in ks]
        crops = [tool.box_for(k, w, h) for k in ks]

    def raw() -> float:
        t = time.perf_counter()
        for x1, y1, x2, y2 in crops:
            resize_max_side(img[y1:y2, x1:x2], env.zoom_size)
        return time.perf_counter() - t

    def stepped() -> float:
        t = time.perf_counter()
        for a in actions:
            env.step(a)
        return time.perf_counter() - t

    raw(), stepped()  # warm-up
    # interleave the two so a busy machine slows both alike; keep the best of each
    pairs = [(raw(), stepped()) for _ in range(args.repeats)]
    t_raw = min(p[0] for p in pairs)
    t_env = min(p[1] for p in pairs)
    n = args.steps
    res = {"zoom": args.zoom, "steps": n, "raw_crop_resize_per_s": n / t_raw, "env_zoom_steps_per_s": n / t_env, "ratio_env_over_raw": t_env / t_raw}
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
