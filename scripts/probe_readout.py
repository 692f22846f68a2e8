"""Probe: where does the marker's cell get lost between the image and the zoom number?

For a model folder (a warm start, or a model saved by ``probe_localisation.py --save``),
on ChainOfFocus held-out tasks (``task_index`` 0..N-1, region zoom), this measures with
linear read-outs (logistic regression, 3/4 of the tasks to fit, 1/4 to score; chance 1/16):

- ``marker_token``: the cell from the hidden state of the image token that holds the
  marker, after each layer of the language model (layer 0: the vision tower's output).
  Low here means the image features do not carry the cell code where the marker is.
- ``query``: the cell from the hidden state at the position that predicts the zoom
  number (the prompt, then ``<tool_call>{"name": "zoom", "arguments": {"region": ``).
  Low here with high ``marker_token`` means attention does not bring the code over.
- ``attention``: each layer's head-0 attention mass on the marker token at that query
  position, and how often it is the image token with the most attention.

    python scripts/probe_readout.py embedded:focus_warm --set grid_code_alpha=0.6

Findings of session 4 are in docs/focus_localisation_history.md ("Where localisation fails").
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
from probe_localisation import env_kwargs, marker_centre, marker_position  # same folder

PREFIX = '<tool_call>{"name": "zoom", "arguments": {"region": '


def fit_score(x: np.ndarray, y: np.ndarray) -> float:
    """Held-out accuracy of a multinomial logistic read-out (features L2-normalised)."""
    from sklearn.linear_model import LogisticRegression

    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)
    n = len(y) * 3 // 4
    clf = LogisticRegression(max_iter=5000, C=10.0).fit(x[:n], y[:n])
    return round(float(clf.score(x[n:], y[n:])), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--tasks", type=int, default=600)
    ap.add_argument("--set", action="append", default=[], help="env kwarg override key=value (YAML value)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise SystemExit("this probe needs scikit-learn: pip install scikit-learn") from None
    import gymnasium as gym
    import torch

    import mmgym  # noqa: F401
    from mmgym.agents import HFPolicy
    from mmgym.agents.chat import Conversation
    from mmgym.trainer.common import model_dir

    torch.set_num_threads(args.threads)
    kwargs: dict[str, Any] = env_kwargs(args.set)
    policy = HFPolicy(model_dir(args.model), attn_implementation="eager")
    model, proc = policy.model, policy.processor
    merge = model.config.vision_config.spatial_merge_size
    env = gym.make("mmgym/ChainOfFocus-v0", **kwargs).unwrapped
    layers = model.config.text_config.num_hidden_layers
    marker_h: list[list[np.ndarray]] = [[] for _ in range(layers + 1)]
    query_h: list[list[np.ndarray]] = [[] for _ in range(layers + 1)]
    mass, top, cells = [], [], []
    for i in range(args.tasks):
        obs, _ = env.reset(options={"task_index": i})
        conv = Conversation()
        conv.add_observation(obs, turn=0)
        enc = proc(text=[policy.render(conv) + PREFIX], images=[obs["images"]], return_tensors="pt")
        m, image_pos = marker_position(enc["input_ids"][0], enc["image_grid_thw"][0], marker_centre(env),
                                       model.config.image_token_id, merge)
        with torch.no_grad():
            out = model(**enc, output_hidden_states=True, output_attentions=True)
        for layer in range(layers + 1):
            marker_h[layer].append(out.hidden_states[layer][0, m].float().numpy())
            query_h[layer].append(out.hidden_states[layer][0, -1].float().numpy())
        att = torch.stack([a[0, 0, -1] for a in out.attentions])  # (layers, T): head 0, last position
        mass.append(att[:, m].numpy())
        top.append((image_pos[att[:, image_pos].argmax(-1)] == m).float().numpy())
        cells.append(env.oracle_region(0) - 1)
    y = np.array(cells)
    result = {
        "model": args.model, "env_kwargs": kwargs, "tasks": args.tasks,
        "marker_token": [fit_score(np.array(marker_h[k]), y) for k in range(layers + 1)],
        "query": [fit_score(np.array(query_h[k]), y) for k in range(layers + 1)],
        "attention_mass": np.mean(mass, axis=0).round(3).tolist(),
        "attention_top": np.mean(top, axis=0).round(3).tolist(),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
