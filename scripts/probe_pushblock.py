"""Probe: can the embedded model learn *which way to push* on PushBlock's aligned layout?

The aligned layout reduces the task to one choice, the push direction (one of four), which
must be read off the camera image. This trains the first view alone, supervised, to name the
direction (one word: ``left``/``right``/``up``/``down``, the loss on that word only), and
reports held-out accuracy on the trainer's evaluation tasks (``task_index`` 0..N-1; chance
0.25, a constant answer about 0.275) as it goes. If supervision cannot teach it within a
budget, neither SFT on the expert's action tokens nor RL from success will.

    python scripts/probe_pushblock.py --steps 300 --set 'cameras=[wrist]'

``--set key=value`` overrides PushBlock's env kwargs (values parsed as YAML).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from probe_localisation import parse_sets

WORDS = ("right", "left", "up", "down")  # +x, -x, +y, -y


def direction(env: Any) -> int:
    d = env.s.goal - env.s.block
    ax = int(abs(d[1]) > abs(d[0]))
    return 2 * ax + int(d[ax] < 0)


def make_tasks(kwargs: dict[str, Any], keys: list[int], held_out: bool) -> list[tuple[list[np.ndarray], str, int]]:
    import gymnasium as gym

    import mmgym  # noqa: F401

    env = gym.make("mmgym/PushBlock-v0", **kwargs).unwrapped
    out = []
    for k in keys:
        obs, _ = env.reset(options={"task_index": k}) if held_out else env.reset(seed=k)
        out.append((list(obs["images"]), obs["text"], direction(env)))
    return out


def save_views(path: str) -> None:
    import cv2

    tasks = make_tasks({"layout": "aligned", "chunk_size": 4, "cameras": ["top", "wrist"]}, list(range(4)), True)
    cols = [np.concatenate([np.pad(v, ((2, 2), (2, 2), (0, 0)), constant_values=255) for v in views], 0) for views, _, _ in tasks]
    cv2.imwrite(path, cv2.cvtColor(np.concatenate(cols, 1), cv2.COLOR_RGB2BGR))
    print(f"wrote {path}: directions {[WORDS[d] for *_, d in tasks]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:base")
    ap.add_argument("--set", action="append", default=[], help="env kwarg override key=value")
    ap.add_argument("--train-tasks", type=int, default=4096)
    ap.add_argument("--eval-tasks", type=int, default=200)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the curve as JSON here")
    ap.add_argument("--save-views", default=None,
                    help="only write a PNG of the first 4 held-out tasks, the top view above the wrist view, and exit")
    args = ap.parse_args()
    if args.save_views:
        save_views(args.save_views)
        return

    import torch

    from mmgym.agents import HFPolicy
    from mmgym.agents.chat import Conversation
    from mmgym.trainer.common import model_dir

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    kwargs: dict[str, Any] = {"layout": "aligned", "chunk_size": 4, **parse_sets(args.set)}
    t0 = time.time()
    train = make_tasks(kwargs, list(range(10**6 + args.seed * 10**5, 10**6 + args.seed * 10**5 + args.train_tasks)), False)
    held = make_tasks(kwargs, list(range(args.eval_tasks)), True)
    print(f"tasks: {len(train)} train, {len(held)} held out in {time.time() - t0:.0f}s; "
          f"held-out directions {np.bincount([d for *_, d in held], minlength=4).tolist()}", flush=True)

    policy = HFPolicy(model_dir(args.model))
    model, proc = policy.model, policy.processor
    tok = proc.tokenizer
    word_ids = [tok.encode(" " + w, add_special_tokens=False)[0] for w in WORDS]
    assert len(set(word_ids)) == 4, "the four words must start with distinct tokens"

    def render(views: list[np.ndarray], text: str) -> str:
        conv = Conversation()
        conv.add_observation({"text": text + "\nWhich way must the block be pushed?", "images": views, "frames": [], "frame_times": []}, turn=0)
        return policy.render(conv) + "Push"

    def inputs(items: list) -> tuple[dict[str, Any], torch.Tensor]:
        tok.padding_side = "left"
        enc = proc(text=[render(v, t) for v, t, _ in items], images=[v for v, _, _ in items], return_tensors="pt", padding=True)
        return enc, torch.tensor([d for *_, d in items])

    def scores(enc: dict[str, Any]) -> torch.Tensor:
        logits = model(**enc).logits[:, -1]
        return logits[:, word_ids]

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        right = 0
        for lo in range(0, len(held), 50):
            enc, y = inputs(held[lo: lo + 50])
            right += int((scores(enc).argmax(-1) == y).sum())
        model.train()
        return right / len(held)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed)
    curve = [{"step": 0, "acc": evaluate()}]
    print(curve[-1], flush=True)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        batch = [train[i] for i in rng.integers(len(train), size=args.batch)]
        enc, y = inputs(batch)
        # the loss over the whole vocabulary at the answer position: the word itself is trained
        logits = model(**enc).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(word_ids)[y])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            curve.append({"step": step, "loss": round(float(loss), 4), "acc": evaluate(), "s_per_step": round((time.time() - t0) / step, 2)})
            print(curve[-1], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "env_kwargs": kwargs, "curve": curve}, indent=2))


if __name__ == "__main__":
    main()
