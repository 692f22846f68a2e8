"""Pieces the trainer's stages share: building the policy, demonstrations, evaluation,
row selection of a ``RolloutBatch``."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmgym.agents import Conversation, Generation, HFPolicy, LoraSettings, RolloutCollector, RolloutSettings, SamplingParams
from mmgym.agents.episodes import write_episode_html, write_index_html
from mmgym.core import RolloutBatch, Trajectory
from mmgym.envs.registration import env_policy_tokens
from mmgym.trainer import distributed as dist_utils
from mmgym.trainer.config import TrainConfig

__all__ = ["model_dir", "build_policy", "DemonstrationPolicy", "select_rows", "evaluate", "episode_summary", "EVAL_CHUNK"]

log = logging.getLogger(__name__)
EVAL_CHUNK = 50


def model_dir(path: str | Path) -> Path:
    """A model folder from ``embedded:NAME``, a run folder (its latest checkpoint), a
    checkpoint folder or a model folder."""
    from mmgym.agents import tiny_model_path
    from mmgym.trainer.run_dir import RunDir

    if isinstance(path, str) and path.startswith("embedded:"):
        name = path.split(":", 1)[1]
        base = tiny_model_path()
        p = base if name == "base" else base.with_name(f"{base.name}_{name}")
        if not (p / "config.json").is_file():
            known = ["base"] + sorted(d.name.removeprefix(base.name + "_") for d in base.parent.glob(base.name + "_*"))
            raise FileNotFoundError(f"no embedded model {name!r}; known: {', '.join(known)}")
        return p
    p = Path(path)
    run = RunDir(p)
    if run.ckpt_root.is_dir():
        ck = run.latest_checkpoint()
        if ck is None:
            raise FileNotFoundError(f"run folder {str(path)!r} has no complete checkpoint")
        p = ck
    return p / "model" if (p / "model").is_dir() else p


def build_policy(cfg: TrainConfig, model_path: str | Path | None = None) -> HFPolicy:
    """The policy to train: ``model_path`` (a checkpoint) or ``cfg.model.path`` or the embedded tiny model."""
    path = model_path if model_path is not None else model_dir(cfg.model.path)
    lora = LoraSettings(r=cfg.model.lora_rank) if cfg.model.lora else None
    return HFPolicy(path, lora=lora, max_context=cfg.model.max_context, device=learner_device(cfg.model.device),
                    add_tokens=env_policy_tokens(cfg.env.id, cfg.env.make_kwargs))


def backward_step(policy: HFPolicy, optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float) -> None:
    """``loss.backward()``, gradients averaged over data-parallel ranks, the trainable
    parameters' norm clipped to ``grad_clip``, one optimizer step (the caller zeroed the
    gradients and checked that ``loss`` is finite)."""
    loss.backward()
    dist_utils.average_gradients(policy.model)
    torch.nn.utils.clip_grad_norm_(list(policy.parameters()), grad_clip)
    optimizer.step()


def learner_device(name: str) -> str:
    """``auto``: this rank's CUDA device (``LOCAL_RANK``) when CUDA is available, else ``cpu``."""
    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"model.device={name!r} but torch sees no CUDA device; use model.device=cpu or auto")
        return name
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    return "cpu"


class DemonstrationPolicy:
    """Teacher forcing for the supervised warm start: the env's oracle writes each reply,
    and the reply is tokenised and recorded through the model's own encoder exactly as a
    sampled reply would be (action mask 1), so SFT trains on the same token layout as RL.
    """

    def __init__(self, policy: HFPolicy, *, zoom_noise: float = 0.0, seed: int = 0):
        self.policy = policy
        self.zoom_noise = float(zoom_noise)
        self.rng = np.random.default_rng(seed)

    def _reply(self, env: Any) -> str:
        base = env.unwrapped
        if self.zoom_noise > 0 and hasattr(base, "demonstration_action"):
            return base.demonstration_action(self.rng, self.zoom_noise)
        return base.oracle_action()

    def generate(self, conversations: Sequence[Conversation], sampling: SamplingParams) -> list[Generation]:
        if any(c.meta.get("env") is None for c in conversations):
            raise ValueError("DemonstrationPolicy asks the env's oracle for each reply, so it needs the in-process env in "
                             "Conversation.meta['env']; envs in a worker pool (RolloutCollector backend 'process'/'ray') "
                             "have none: collect demonstrations with backend='local'")
        enc = self.policy.encoder
        results, ready = enc.prepare(conversations, sampling.max_new_tokens)
        eos = enc.eos_token_ids[0]
        for p in ready:
            env = conversations[p.index].meta["env"]
            text = self._reply(env)
            ids = list(self.policy.tokenizer.encode(text, add_special_tokens=False)) + [eos]
            enc.add_reply(p.state, ids, [0.0] * len(ids), ended=True, text=text)
            results[p.index] = Generation(text=text, token_ids=ids, logprobs=[0.0] * len(ids))
        return [g for g in results if g is not None]

    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        return self.policy.logprobs(batch)


def select_rows(batch: RolloutBatch, idx: Sequence[int]) -> RolloutBatch:
    """The sub-batch of rows ``idx`` (tensors, and list-valued extras, row by row)."""
    index = torch.as_tensor(list(idx), dtype=torch.long)
    kw: dict[str, Any] = {}
    for f in fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, torch.Tensor):
            kw[f.name] = v[index.to(v.device)]
        elif f.name == "extras":
            ex = {}
            for k, x in v.items():
                if isinstance(x, torch.Tensor) and x.shape[:1] == (batch.batch_size,):
                    ex[k] = x[index]
                elif isinstance(x, list) and len(x) == batch.batch_size:
                    ex[k] = [x[i] for i in idx]
                else:
                    ex[k] = x
            kw[f.name] = ex
        else:
            kw[f.name] = v
    return replace(batch, **kw)


def episode_summary(trajs: Sequence[Trajectory]) -> dict[str, float]:
    """Success, return, turns, tool calls and every reward term, averaged per episode."""
    if not trajs:
        return {}
    out = {
        "success": float(np.mean([t.success for t in trajs])),
        "reward_mean": float(np.mean([t.total_reward for t in trajs])),
        "turns": float(np.mean([t.num_turns for t in trajs])),
        "tool_calls": float(np.mean([t.num_tool_calls for t in trajs])),
        "episodes": float(len(trajs)),
    }
    terms: dict[str, list[float]] = {}
    for t in trajs:
        for k, v in t.reward_terms().items():
            terms.setdefault(k, []).append(v)
    for k, vs in terms.items():
        out[f"term/{k}"] = float(np.sum(vs) / len(trajs))
    hits = [t.info.get("metrics", {}).get("zoom_hit") for t in trajs]
    hits = [h for h in hits if h is not None]
    if hits:
        out["zoom_hit"] = float(np.mean(hits))
    return out


def evaluate(policy: Any, env_id: str, env_kwargs: dict[str, Any], *, episodes: int, max_new_tokens: int,
             system_prompt: str | None = None, tool_schemas: bool = True, pages_dir: Path | None = None, pages: int = 0, progress: bool = False) -> tuple[dict[str, float], list[Trajectory]]:
    """Greedy episodes on the fixed evaluation tasks ``task_index = 0..episodes-1``."""
    settings = RolloutSettings(sampling=SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens),
                               system_prompt=system_prompt, keep_images=pages > 0, tool_schemas=tool_schemas)
    trajs: list[Trajectory] = []
    chunks = range(0, episodes, EVAL_CHUNK)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="eval", unit="chunk", leave=False)
    collector = RolloutCollector(env_id, num_tasks=min(EVAL_CHUNK, episodes), group_size=1, settings=settings, env_kwargs=env_kwargs)
    try:
        was_training = getattr(policy, "model", None) is not None and policy.model.training
        if hasattr(policy, "eval"):
            policy.eval()
        for lo in chunks:
            n = min(EVAL_CHUNK, episodes - lo)
            if n != len(collector.runners):
                collector.close()
                collector = RolloutCollector(env_id, num_tasks=n, group_size=1, settings=settings, env_kwargs=env_kwargs)
            trajs += collector.collect(policy, task_indices=list(range(lo, lo + n)))
        if was_training:
            policy.train()
    finally:
        collector.close()
    if pages_dir is not None and pages > 0:
        entries = []
        for i, t in enumerate(trajs[:pages]):
            name = f"episode_{i:03d}"
            write_episode_html(t, pages_dir, name, title=f"{env_id} · eval task {i}")
            entries.append((name, t))
        write_index_html(pages_dir, entries, title=f"{env_id} · evaluation")
    for t in trajs:  # drop model inputs (pixel tensors) kept for training
        t.info.pop("model_inputs", None)
    return episode_summary(trajs), trajs
