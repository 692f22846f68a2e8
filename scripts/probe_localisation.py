"""Probe: can a model learn *where to look* on ChainOfFocus, with plain supervision?

Trains the first turn only (first view + question -> the oracle's ``zoom(region=k)`` call)
on freshly generated procedural tasks, and reports the greedy zoom hit rate (``hit``) on the
held-out evaluation tasks (``task_index`` 0..N-1, the trainer's eval set) as it goes.
This isolates localisation from reading: if supervision cannot teach it within a budget,
RL from a zoom reward will not either. Region zoom only.

``--target answer`` is the leak check instead: the same first turn trained to answer at
once (``<answer>option</answer>``, no zoom); its held-out accuracy should stay at chance
(0.25) if the first view really hides the answer.

    python scripts/probe_localisation.py --steps 600 --set view_size=224 --out /tmp/probe.json

``--target features`` probes the frozen vision tower instead: a linear and a small MLP
scorer over the merged image tokens, trained to pick the token holding the marker (needs a
square view whose grid cells are whole tokens, e.g. ``--set canvas=[1400,1400]`` at view
112 and grid 4). High accuracy there and chance above says the vision features know where
the marker is and the language model does not learn to read it out.

``--set key=value`` overrides the default recipe's env kwargs (values parsed as YAML).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import yaml


def _env(kwargs: dict[str, Any]) -> Any:
    import gymnasium as gym

    import mmgym  # noqa: F401  (registers the envs)

    return gym.make("mmgym/ChainOfFocus-v0", **kwargs).unwrapped


def parse_sets(sets: list[str]) -> dict[str, Any]:
    """``--set key=value`` arguments as a dict (values parsed as YAML); the scripts' one parser."""
    out: dict[str, Any] = {}
    for kv in sets:
        k, v = kv.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def env_kwargs(sets: list[str]) -> dict[str, Any]:
    """The default recipe's env kwargs with ``key=value`` overrides (values parsed as YAML)."""
    from mmgym.trainer.config import _default_env_kwargs

    return {**_default_env_kwargs(), **parse_sets(sets)}


def marker_centre(env: Any) -> tuple[float, float]:
    """The first target's centre as fractions (x, y) of the image (and so of the first view)."""
    x1, y1, x2, y2 = env.task.boxes[0]
    h, w = env.task.image.shape[:2]
    return (x1 + x2) / 2 / w, (y1 + y2) / 2 / h


def marker_position(input_ids: Any, grid_thw: Any, centre: tuple[float, float], image_token_id: int, merge: int) -> tuple[int, Any]:
    """Sequence position of the merged image token (the first image's; raster order) that
    holds ``centre``, and the positions of all image tokens in ``input_ids``."""
    _, gh, gw = (int(v) for v in grid_thw)
    mh, mw = gh // merge, gw // merge
    r, c = min(mh - 1, int(centre[1] * mh)), min(mw - 1, int(centre[0] * mw))
    image_pos = (input_ids == image_token_id).nonzero()[:, 0]
    return int(image_pos[r * mw + c]), image_pos


def number_positions(ids: list[int], labels: list[int], decode: Any) -> list[int]:
    """Token positions of the region number's digits inside the target (``labels != -100``):
    the first digit token after ``"region":``, and the digit tokens that follow it."""
    for j in (k for k, v in enumerate(labels) if v != -100):
        if decode(ids[j: j + 1]).strip().isdigit() and "region" in decode(ids[:j][-8:]):
            out = [j]
            while out[-1] + 1 < len(ids) and labels[out[-1] + 1] != -100 and decode(ids[out[-1] + 1: out[-1] + 2]).strip().isdigit():
                out.append(out[-1] + 1)
            return out
    raise RuntimeError("no region number in the target")


def _tasks(args: tuple[dict[str, Any], list[int], bool, str]) -> list[tuple[np.ndarray, str, Any]]:
    kwargs, keys, held_out, kind = args
    env = _env(kwargs)
    out = []
    for k in keys:
        opts = {"task_index": k} if held_out else None
        obs, _ = env.reset(seed=None if held_out else k, options=opts)
        target = env.task.options[env.task.correct] if kind == "answer" else env.oracle_region(0)
        out.append((obs["images"][0], obs["text"], target, marker_centre(env)))
    return out


def make_tasks(kwargs: dict[str, Any], keys: list[int], held_out: bool, workers: int, kind: str) -> list[tuple[np.ndarray, str, Any]]:
    chunks = [keys[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers) as ex:
        parts = list(ex.map(_tasks, [(kwargs, c, held_out, kind) for c in chunks]))
    return [t for p in parts for t in p]


def feature_probe(model: Any, proc: Any, train: list, held: list, steps: int, grid: int) -> dict[str, float]:
    """Held-out accuracy of picking the marker's token from frozen merged image features."""
    import torch

    def feats(items: list) -> tuple[torch.Tensor, torch.Tensor]:
        xs = []
        with torch.no_grad():
            for view, *_ in items:
                enc = proc.image_processor(images=[view], return_tensors="pt")
                out = model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"])
                xs.append((out.pooler_output if hasattr(out, "pooler_output") else out)[0])
        if any(len(x) != grid * grid for x in xs):
            raise SystemExit(f"--target features needs one merged token per grid cell; got {[len(x) for x in xs[:3]]} tokens for {grid * grid} cells")
        return torch.stack(xs), torch.tensor([k - 1 for _, _, k, _ in items])

    xtr, ytr = feats(train)
    xte, yte = feats(held)
    result: dict[str, float] = {}
    for name, scorer in (("linear", torch.nn.Linear(xtr.shape[-1], 1)),
                         ("mlp", torch.nn.Sequential(torch.nn.Linear(xtr.shape[-1], 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)))):
        opt = torch.optim.Adam(scorer.parameters(), lr=1e-2)
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(scorer(xtr).squeeze(-1), ytr)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            result[f"{name}_token_acc"] = float((scorer(xte).squeeze(-1).argmax(-1) == yte).float().mean())
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:focus_warm")
    ap.add_argument("--target", choices=("zoom", "answer", "features"), default="zoom")
    ap.add_argument("--set", action="append", default=[], help="env kwarg override key=value")
    ap.add_argument("--train-tasks", type=int, default=4096)
    ap.add_argument("--eval-tasks", type=int, default=200)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-last", action="store_true", help="move the image after the question text")
    ap.add_argument("--tiles", action="store_true",
                    help="give the first view as one labelled image per grid cell ('Cell k: <image>'), Set-of-Mark style")
    ap.add_argument("--attn-sup", type=float, default=0.0,
                    help="weight of an attention-supervision loss: the supervised heads' attention, at the "
                         "position that predicts the region number, should fall on the marker's image token")
    ap.add_argument("--attn-heads", default="0", help="comma-separated heads supervised in every layer")
    ap.add_argument("--attn-layers", default="all", help="comma-separated layers supervised, or 'all'")
    ap.add_argument("--freeze-vision", action="store_true",
                    help="train the language model only (the vision tower, merger included, stays as loaded)")
    ap.add_argument("--vision-lr-scale", type=float, default=1.0,
                    help="the vision tower's learning rate as a multiple of --lr")
    ap.add_argument("--code-sup", type=float, default=0.0,
                    help="weight of a code-keeping loss: a linear read-out of the marker's image token (the "
                         "vision tower's output, as the language model receives it) must name the marker's cell")
    ap.add_argument("--code-sup-from", type=int, default=0,
                    help="first step at which the code-keeping loss applies (attention first, then the code)")
    ap.add_argument("--mask-number", action="store_true",
                    help="leave the region number's tokens out of the cross-entropy: the reply's format is "
                         "trained, which cell to zoom into is not (the auxiliary losses still apply)")
    ap.add_argument("--save", default=None, help="save the probed model folder here at the end")
    ap.add_argument("--out", default=None, help="write the curve as JSON here")
    args = ap.parse_args()

    import torch

    from mmgym.agents import HFPolicy
    from mmgym.agents.chat import Conversation
    from mmgym.trainer.common import model_dir

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    kwargs = env_kwargs(args.set)
    t0 = time.time()
    train = make_tasks(kwargs, list(range(10**6 + args.seed * 10**5, 10**6 + args.seed * 10**5 + args.train_tasks)), False, args.workers, args.target)
    held = make_tasks(kwargs, list(range(args.eval_tasks)), True, args.workers, args.target)
    print(f"tasks: {len(train)} train, {len(held)} held out in {time.time() - t0:.0f}s", flush=True)

    policy = HFPolicy(model_dir(args.model))
    model, proc = policy.model, policy.processor
    tok = proc.tokenizer
    if args.target == "features":
        result = feature_probe(model, proc, train, held, args.steps, int(kwargs["grid"]))
        print(result, flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"args": vars(args), "env_kwargs": kwargs, **result}, indent=2))
        return

    grid = int(kwargs["grid"])

    def images_of(view: np.ndarray) -> list[np.ndarray]:
        if not args.tiles:
            return [view]
        from mmgym.tools.zoom import region_box

        h, w = view.shape[:2]
        return [np.ascontiguousarray(view[y1:y2, x1:x2]) for x1, y1, x2, y2 in
                (region_box(k, grid, w, h) for k in range(1, grid * grid + 1))]

    def render(view: np.ndarray, text: str, action: str | None) -> str:
        if args.tiles:
            cells = " ".join(f"Cell {k}: <image>" for k in range(1, grid * grid + 1))
            text = text.replace("<image>", cells, 1)
        if args.image_last:
            text = text.replace("<image>\n", "", 1) + "\n<image>"
        conv = Conversation()
        conv.add_observation({"text": text, "images": images_of(view), "frames": [], "frame_times": []}, turn=0)
        if action is not None:
            conv.add_action(action)
        return policy.render(conv)

    def call(k: Any) -> str:
        if args.target == "answer":
            return f"<answer>{k}</answer>"
        return f'<tool_call>{{"name": "zoom", "arguments": {{"region": {k}}}}}</tool_call>'

    def read(text: str) -> Any:
        if args.target == "answer":
            return text.split("<answer>", 1)[1].split("</answer>", 1)[0].strip()
        return int(text.split('"region":', 1)[1].split("}", 1)[0])

    def batch_inputs(items: list[tuple[np.ndarray, str, int]], with_target: bool) -> tuple[dict[str, Any], torch.Tensor | None, torch.Tensor | None]:
        """Model inputs, the cross-entropy labels (the number's digits left out with
        ``--mask-number``) and the whole target's labels (where ``number_query`` looks)."""
        texts = [render(v, t, call(k) if with_target else None) for v, t, k, _ in items]
        tok.padding_side = "right" if with_target else "left"
        enc = proc(text=texts, images=[images_of(v) for v, *_ in items], return_tensors="pt", padding=True)
        if not with_target:
            return enc, None, None
        labels = enc["input_ids"].clone()
        for i, (v, t, *_) in enumerate(items):
            n = len(proc(text=[render(v, t, None)], images=[images_of(v)], return_tensors="pt")["input_ids"][0])
            labels[i, :n] = -100
        labels[enc["attention_mask"] == 0] = -100
        target = labels.clone()
        if args.mask_number:
            for i in range(len(items)):
                labels[i, number_positions(enc["input_ids"][i].tolist(), target[i].tolist(), tok.decode)] = -100
        return enc, labels, target

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()
        hits, parsed = 0, 0
        for lo in range(0, len(held), 50):
            part = held[lo: lo + 50]
            enc, _, _ = batch_inputs(part, False)
            out = model.generate(**enc, max_new_tokens=24, do_sample=False)
            for row, (_, _, k, _) in zip(out[:, enc["input_ids"].shape[1]:], part):
                text = tok.decode(row, skip_special_tokens=False)
                try:
                    got = read(text)
                    parsed += 1
                    hits += int(got == k)
                except (IndexError, ValueError):
                    pass
        model.train()
        return {"hit": hits / len(held), "parsed": parsed / len(held)}

    image_id = model.config.image_token_id
    merge = model.config.vision_config.spatial_merge_size
    heads = [int(h) for h in args.attn_heads.split(",")]
    att_losses: list[float] = []
    if args.attn_sup > 0:
        model.set_attn_implementation("eager")

    def number_query(b: int, enc: dict[str, Any], target: torch.Tensor) -> int:
        """Position whose logits predict the region number's first token."""
        return number_positions(enc["input_ids"][b].tolist(), target[b].tolist(), tok.decode)[0] - 1

    def markers_of(enc: dict[str, Any], items: list) -> list[int]:
        """Sequence position of each row's marker token."""
        return [marker_position(enc["input_ids"][b], enc["image_grid_thw"][b], item[3], image_id, merge)[0] for b, item in enumerate(items)]

    def attention_loss(attentions: tuple, enc: dict[str, Any], target: torch.Tensor, markers: list[int]) -> torch.Tensor:
        layers = range(len(attentions)) if args.attn_layers == "all" else [int(v) for v in args.attn_layers.split(",")]
        terms = []
        for b, m in enumerate(markers):
            q = number_query(b, enc, target)
            for layer in layers:
                for h in heads:
                    terms.append(-torch.log(attentions[layer][b, h, q, m] + 1e-6))
        return torch.stack(terms).mean()

    code_head = torch.nn.Linear(model.config.text_config.hidden_size, grid * grid) if args.code_sup > 0 else None
    code_losses: list[float] = []

    def code_loss(hidden0: torch.Tensor, markers: list[int], items: list) -> torch.Tensor:
        """Cross-entropy of the marker's cell from its image token's features (``code_head``)."""
        rows = [hidden0[b, m] for b, m in enumerate(markers)]
        target = torch.tensor([int(item[2]) - 1 for item in items])
        return torch.nn.functional.cross_entropy(code_head(torch.stack(rows)), target)

    if args.freeze_vision:
        for p in model.model.visual.parameters():
            p.requires_grad_(False)
    vision = {id(p) for p in model.model.visual.parameters()}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and (id(p) in vision) == is_vision],
               "lr": args.lr * (args.vision_lr_scale if is_vision else 1.0)} for is_vision in (False, True)]
    if code_head is not None:
        groups.append({"params": list(code_head.parameters()), "lr": args.lr})
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed)
    curve = [{"step": 0, **evaluate(), "s": round(time.time() - t0, 1)}]
    print(curve[-1], flush=True)
    model.train()
    losses: list[float] = []
    for step in range(1, args.steps + 1):
        items = [train[i] for i in rng.choice(len(train), size=args.batch, replace=False)]
        enc, labels, target = batch_inputs(items, True)
        markers = markers_of(enc, items) if args.attn_sup > 0 or code_head is not None else []
        out = model(**enc, labels=labels, output_attentions=args.attn_sup > 0, output_hidden_states=code_head is not None)
        loss = out.loss
        if args.attn_sup > 0:
            att = attention_loss(out.attentions, enc, target, markers)
            loss = loss + args.attn_sup * att
            att_losses.append(float(att.detach()))
        if code_head is not None and step >= args.code_sup_from:
            code = code_loss(out.hidden_states[0], markers, items)
            loss = loss + args.code_sup * code
            code_losses.append(float(code.detach()))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % args.eval_every == 0 or step == args.steps:
            curve.append({"step": step, "loss": round(float(np.mean(losses[-args.eval_every:])), 4),
                          **({"attn_loss": round(float(np.mean(att_losses[-args.eval_every:])), 3)} if att_losses else {}),
                          **({"code_loss": round(float(np.mean(code_losses[-args.eval_every:])), 3)} if code_losses else {}), **evaluate(),
                          "s": round(time.time() - t0, 1)})
            print(curve[-1], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "env_kwargs": kwargs, "curve": curve}, indent=2))
    if args.save:
        model.save_pretrained(args.save)
        proc.save_pretrained(args.save)


if __name__ == "__main__":
    main()
