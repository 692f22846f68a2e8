"""The trainer: an optional supervised warm start, then ``collect -> score -> estimate
-> update`` iterations of multi-turn RL, with evaluation, checkpoints and resume.

Each stage is a named method; the estimator, policy loss, aggregation, task sampler and
token weighting come from the algorithms' registries by name (``_TW_NEEDS`` only says
which inputs each built-in weighting reads). One estimator needs a model of its own:
``prime`` reads dense rewards from an online-trained PRM (``mmgym.trainer.prime``), which
``learn`` steps and scores around ``estimate``; ``matchtir`` and ``durian_grpo`` read
per-episode inputs (gold-call turn rewards, difficulty) that ``score`` takes from the
episodes (``mmgym.trainer.estimator_inputs``). With ``rollout.backend=vllm`` a vLLM
engine samples the rollouts and the learner's weights are pushed into it after each update.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmgym.agents import HFPolicy, RolloutCollector, RolloutSettings, SamplingParams
from mmgym.agents.tokens import action_positions, tool_argument_positions
from mmgym.agents.vllm_backend import VLLMPolicy  # imports vLLM only when one is built
from mmgym.algos import (
    POLICY_LOSSES,
    SAMPLERS,
    AdvantageInputs,
    TokenWeightInputs,
    aggregate,
    broadcast_turn_values,
    compute_advantages,
    compute_token_weights,
    dynamic_sampling_filter,
    kl_penalty,
)
from mmgym.core import RolloutBatch, Trajectory, from_dict
from mmgym.envs.registration import env_policy_tokens
from mmgym.trainer import distributed as dist_utils
from mmgym.trainer.common import DemonstrationPolicy, backward_step, build_policy, episode_summary, evaluate, model_dir, select_rows
from mmgym.trainer.config import TrainConfig
from mmgym.trainer.deepspeed_learner import DeepSpeedLearner, import_deepspeed
from mmgym.trainer.estimator_inputs import attach_estimator_inputs, estimator_extra
from mmgym.trainer.prime import ImplicitPRM
from mmgym.trainer.run_dir import RunDir

__all__ = ["Trainer", "TrainingDiverged", "train"]

log = logging.getLogger(__name__)

# What each built-in token weighting reads besides the action mask, so the trainer runs
# only the forwards it needs. A weighting that reads "logprobs" (the current policy's)
# is computed per minibatch; the others once per update over the whole batch, before
# any step (VPPO normalises within whole groups). A weighting registered elsewhere gets
# the inputs that cost no extra forward, per minibatch (ref_logprobs when KL runs).
_TW_NEEDS: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "vppo": frozenset({"image_logits"}),
    "tor": frozenset({"perception_mask"}),
    "delta_logp": frozenset({"logprobs", "ref_logprobs"}),
    "fipo": frozenset({"logprobs"}),
}
_TW_DEFAULT_NEEDS = frozenset({"logprobs", "perception_mask"})


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses; the last good checkpoint is intact."""


@dataclass
class TrainState:
    phase: str = "sft"  # "sft" -> "rl" -> "done"
    iteration: int = 0
    sft_step: int = 0
    bad_updates: int = 0
    skipped_updates: int = 0
    sampler: dict[str, Any] = field(default_factory=dict)
    evals: dict[str, float] = field(default_factory=dict)  # "warm_start", "final" held-out success


class Trainer:
    """Holds the policy, optimizer, sampler and run folder of one run."""

    def __init__(self, cfg: TrainConfig, run: RunDir, *, progress: bool = True):
        self.cfg = cfg
        self.run = run
        self.progress = progress and dist_utils.is_main()
        if cfg.learner.strategy == "deepspeed":
            import_deepspeed()  # fail before loading any model when the extra is missing
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.rank, self.world = dist_utils.rank_and_world()
        self.state = TrainState()
        ckpt = run.latest_checkpoint()
        self.policy: HFPolicy = build_policy(cfg, ckpt / "model" if ckpt else None)
        self.rollout_policy: HFPolicy | VLLMPolicy = self._build_rollout_policy()
        self._seed_everything(cfg.seed + 1000 * self.rank)
        self.sampler = SAMPLERS.get(cfg.algo.sampler)(cfg.algo.task_pool)
        self.rng = np.random.default_rng([cfg.seed, self.rank])
        self.ref: HFPolicy | None = None
        self.prm: ImplicitPRM | None = None  # PRIME's process reward model (estimator "prime")
        self.learner: DeepSpeedLearner | None = None  # learner.strategy=deepspeed: the ZeRO engine
        self.optimizer = self._make_optimizer(cfg.sft.lr if cfg.sft.enabled else cfg.optim.lr)
        if ckpt is not None:
            self._restore(ckpt)
        elif not cfg.sft.enabled:
            self.state.phase = "rl"
        self.env_kwargs = cfg.env.make_kwargs

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _build_rollout_policy(self) -> HFPolicy | VLLMPolicy:
        """What samples the RL rollouts: the learner (``rollout.backend=hf``), or a vLLM
        engine on the configured model folder (``vllm``; built here, so a missing vLLM or GPU
        fails before any warm start). The engine's weights are the folder's until
        ``sync_rollout`` pushes the learner's (at the start of RL: after a warm start, a
        resume or with LoRA they differ)."""
        r = self.cfg.rollout
        if r.backend == "hf":
            return self.policy
        folder = model_dir(self.cfg.model.path)
        tokens = env_policy_tokens(self.cfg.env.id, self.cfg.env.make_kwargs)
        if tokens:
            from transformers import AutoTokenizer

            have = AutoTokenizer.from_pretrained(folder, local_files_only=True).get_vocab()
            if any(t not in have for t in tokens):
                raise ValueError(f"rollout.backend=vllm: {self.cfg.env.id} needs {len(tokens)} action tokens that the model "
                                 "folder's vocabulary lacks; vLLM cannot grow it. Train with rollout.backend=hf first (it "
                                 "adds them) and point model.path at a checkpoint's model/ folder")
        return VLLMPolicy(folder, learner=self.policy, max_context=self.cfg.model.max_context,
                          gpu_memory_utilization=r.gpu_memory_utilization, tensor_parallel_size=r.tensor_parallel_size,
                          enforce_eager=r.enforce_eager, max_images_per_prompt=r.max_images_per_prompt,
                          seed=self.cfg.seed + 1000 * self.rank)

    def sync_rollout(self) -> dict[str, float]:
        """Push the learner's weights (LoRA merged) into the vLLM engine; ``rollout/sync_s``
        is the wall time, including the GPU copies. Nothing to do (``{}``) with ``hf``."""
        if not isinstance(self.rollout_policy, VLLMPolicy):
            return {}
        t0 = time.perf_counter()
        self.rollout_policy.sync()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the engine's copies are asynchronous
        return {"rollout/sync_s": time.perf_counter() - t0}

    def _make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """A fresh AdamW; with ``learner.strategy=deepspeed`` the ZeRO engine's optimizer
        around it (one engine per run: later calls clear its state instead)."""
        if self.learner is not None:
            return self.learner.reset_optimizer(lr)
        params = [p for p in self.policy.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=self.cfg.optim.weight_decay)
        if self.cfg.learner.strategy == "deepspeed":
            self.learner = DeepSpeedLearner(self.policy, optimizer, zero_stage=self.cfg.learner.zero_stage,
                                            grad_clip=self.cfg.optim.grad_clip)
            return self.learner.optimizer
        return optimizer

    def _restore(self, ckpt: Path) -> None:
        raw = RunDir.load_state(ckpt)
        self.state = from_dict(TrainState, {k: v for k, v in raw.items() if k in TrainState.__dataclass_fields__})
        if self.state.phase != "sft":
            self.optimizer = self._make_optimizer(self.cfg.optim.lr)
        extra = torch.load(ckpt / "optim.pt", weights_only=False)
        if self.learner is not None:
            self.learner.load(ckpt, extra["optimizer"])
        else:
            self.optimizer.load_state_dict(extra["optimizer"])
        torch.set_rng_state(extra["torch_rng"])
        if self.state.sampler:
            self.sampler.load_state_dict(self.state.sampler)
        if (ckpt / "prm").is_dir() and self.cfg.algo.estimator.estimator == "prime":
            self.prm = ImplicitPRM.load(ckpt / "prm", self.policy, self.cfg.algo.prime,
                                        minibatch_size=self.cfg.algo.minibatch_size, weight_decay=self.cfg.optim.weight_decay)
        self.rng = np.random.default_rng([self.cfg.seed, self.rank, self.state.iteration, self.state.sft_step])
        log.info("resumed from %s (phase %s, iteration %d)", ckpt, self.state.phase, self.state.iteration)

    def _lr_at(self, step: int, total: int, base: float, warmup: int, schedule: str) -> float:
        if warmup and step < warmup:
            return base * (step + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return base
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        return base * (1 - frac) if schedule == "linear" else base * 0.5 * (1 + math.cos(math.pi * frac))

    def _set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    # ------------------------------------------------------------------ checkpoints & logs
    def checkpoint(self, step: int, kind: str = "step") -> None:
        """Rank 0 writes the checkpoint (``kind``: ``"step"`` after RL iteration ``step``,
        ``"sft"`` after SFT step ``step``); under DeepSpeed every rank first stages its ZeRO
        optimizer shard, which rank 0 moves into the checkpoint before its atomic rename."""
        if self.learner is not None:
            self.learner.write_shard(self.run.ckpt_root, step)
        if dist_utils.is_main():
            self.state.sampler = self.sampler.state_dict()
            self.run.save_checkpoint(step, policy=self.policy, optimizer=self.learner or self.optimizer, state=self.state.__dict__,
                                     keep=self.cfg.keep_checkpoints, write_extra=lambda folder: self._write_extra(step, folder),
                                     pinned=(0,) if self.cfg.keep_warm_start else (), kind=kind)
        if self.learner is not None:
            dist_utils.barrier()  # no rank stages the next shard before this checkpoint is complete

    def _write_extra(self, step: int, folder: Path) -> None:
        if self.prm is not None:
            self.prm.save(folder)
        if self.learner is not None:
            self.learner.adopt_shards(self.run.ckpt_root, step, folder)

    def log(self, step: int, metrics: dict[str, float], phase: str) -> None:
        if dist_utils.is_main():
            self.run.log_metrics(step, metrics, phase=phase)

    # ------------------------------------------------------------------ supervised warm start
    def collect_demonstrations(self) -> list[Trajectory]:
        cfg = self.cfg
        settings = RolloutSettings(sampling=SamplingParams(temperature=1.0, max_new_tokens=cfg.rollout.max_new_tokens),
                                   system_prompt=cfg.rollout.system_prompt, keep_images=False, tool_schemas=cfg.rollout.tool_schemas)
        n = cfg.sft.demonstrations
        chunk = min(64, n)
        col = RolloutCollector(cfg.env.id, num_tasks=chunk, group_size=1, settings=settings, env_kwargs=self.env_kwargs)
        demos: list[Trajectory] = []
        seeds = np.random.default_rng([cfg.seed, 0xDE40, self.rank]).integers(2**31, size=n)
        try:
            for lo in range(0, n, chunk):
                part = seeds[lo: lo + chunk].tolist()
                if len(part) < chunk:
                    col.close()
                    col = RolloutCollector(cfg.env.id, num_tasks=len(part), group_size=1, settings=settings, env_kwargs=self.env_kwargs)
                demo = DemonstrationPolicy(self.policy, zoom_noise=cfg.sft.zoom_noise, seed=cfg.seed + lo)
                demos += col.collect(demo, seeds=part)
        finally:
            col.close()
        # noisy demonstrations keep their (honest) guesses; clean ones must succeed
        good = [t for t in demos if t.token_ids and (t.success or cfg.sft.zoom_noise > 0)]
        log.info("demonstrations: %d of %d oracle episodes kept", len(good), len(demos))
        if cfg.sft.mask_tool_arguments:
            masked = skipped = 0
            for t in good:
                pos, bad = tool_argument_positions(t, self.policy.tokenizer.decode)
                for j in pos:
                    t.action_mask[j] = 0
                masked, skipped = masked + len(pos), skipped + bad
            self.log(0, {"masked_argument_tokens": float(masked), "unmasked_replies": float(skipped)}, "sft")
        if cfg.sft.mask_guesses:
            guesses = 0
            for t in good:
                span = t.turns[-1].token_span if t.turns else None
                if span is not None and float(t.info.get("metrics", {}).get("zoom_hit", 1.0)) <= 0.0:
                    t.action_mask[span[0]:span[1]] = [0] * (span[1] - span[0])
                    guesses += 1
            self.log(0, {"masked_guesses": float(guesses)}, "sft")
        return good

    def sft(self) -> None:
        """Cross-entropy on the oracle's tokens (action mask), minibatches of episodes."""
        cfg = self.cfg.sft
        demos = self.collect_demonstrations()
        if not demos:
            raise RuntimeError("the oracle produced no successful demonstration; check the env's oracle_action()")
        self.policy.train()
        steps = range(self.state.sft_step, cfg.steps)
        if self.progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc="sft", unit="step", initial=self.state.sft_step, total=cfg.steps)
        for step in steps:
            idx = self.rng.choice(len(demos), size=min(cfg.batch_size, len(demos)), replace=False)
            batch = self.policy.build_batch([demos[i] for i in idx])
            self._set_lr(self._lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps, "constant"))
            context = context_mask(batch, self.policy.suppress_token_ids) if cfg.observation_loss > 0 else None
            logp = self.policy.logprobs(batch if context is None else dataclasses.replace(batch, action_mask=batch.action_mask | context))
            mask = batch.action_mask.float().to(logp.device)
            loss = total = -(logp * mask).sum() / mask.sum().clamp(min=1)
            extra: dict[str, float] = {}
            if context is not None:
                cmask = context.float().to(logp.device)
                context_loss = -(logp * cmask).sum() / cmask.sum().clamp(min=1)
                extra["context_loss"] = float(context_loss.detach())
                total = loss + cfg.observation_loss * context_loss
            if not self._apply(total):
                continue
            self.state.sft_step = step + 1
            if step % 20 == 0 or step == cfg.steps - 1:
                self.log(step, {"loss": float(loss.detach()), "token_acc": float((logp.detach().exp() * mask).sum() / mask.sum().clamp(min=1)), **extra}, "sft")
                if self.progress:
                    steps.set_postfix(loss=f"{float(loss.detach()):.3f}")
            if cfg.checkpoint_every and self.state.sft_step % cfg.checkpoint_every == 0 and self.state.sft_step < cfg.steps:
                self.checkpoint(self.state.sft_step, kind="sft")
        self.policy.eval()

    # ------------------------------------------------------------------ RL stages
    def collect(self, iteration: int) -> tuple[list[Trajectory], list[int]]:
        """Sample N tasks from the task pool and play G episodes of each."""
        cfg = self.cfg.rollout
        task_ids = self.sampler.select(cfg.tasks_per_iter, self.rng)
        seeds = [int(self.cfg.seed * 1_000_003 + 7919 * t + self.rank) % 2**31 for t in task_ids]
        settings = RolloutSettings(
            sampling=SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens),
            system_prompt=cfg.system_prompt, keep_images=False, tool_schemas=cfg.tool_schemas,
            visual_entropy=self.cfg.algo.estimator.estimator == "durian_grpo")  # Durian's difficulty reads it
        self.policy.eval()
        trajs = self.collector.collect(self.rollout_policy, seeds=seeds, settings=settings)
        return trajs, task_ids

    def score(self, trajs: list[Trajectory], task_ids: list[int]) -> tuple[RolloutBatch | None, dict[str, float]]:
        """Pad trajectories into a batch (with what the estimator reads from the episodes:
        ``mmgym.trainer.estimator_inputs``); update the task sampler; optionally drop flat groups.

        Episodes that ended with ``env_error`` stay out of the batch; those whose env failed
        in the worker pool (``info["env_error"]``) also stay out of the sampler's success
        rates and are counted as ``env_errors``. None: no episode is left to train on."""
        G = self.cfg.rollout.group_size
        groups = [[t for t in trajs[g * G:(g + 1) * G] if "env_error" not in t.info] for g in range(len(task_ids))]
        seen = [g for g in range(len(task_ids)) if groups[g]]
        self.sampler.update([task_ids[g] for g in seen], [float(np.mean([t.success for t in groups[g]])) for g in seen])
        metrics = episode_summary(trajs)
        metrics["errors"] = float(sum(t.termination_reason == "env_error" for t in trajs))
        metrics["env_errors"] = float(sum("env_error" in t.info for t in trajs))
        keep = [i for i, t in enumerate(trajs) if t.token_ids and t.termination_reason != "env_error"]
        if not keep:
            log.warning("no episode of this iteration can be trained on (%d env errors of %d); update skipped", int(metrics["errors"]), len(trajs))
            return None, metrics
        kept = [trajs[i] for i in keep]
        batch = self.policy.build_batch(kept)
        metrics.update(attach_estimator_inputs(batch, kept, self.cfg.algo))  # MatchTIR, Durian: from the episodes
        if self.cfg.algo.drop_zero_variance_groups:
            mask = dynamic_sampling_filter(batch.outcome, batch.group_ids)
            metrics["kept_fraction"] = float(mask.float().mean())
            if bool(mask.any()):
                batch = select_rows(batch, mask.nonzero()[:, 0].tolist())
        return batch, metrics

    def refresh_old_logprobs(self, batch: RolloutBatch) -> dict[str, float]:
        """With ``rollout.recompute_old_logprobs``: overwrite ``batch.old_logprobs`` (B, T),
        the sampler's, with the learner's, under no_grad, before any update step. pi_old of
        the PPO ratio is then the learner's own forward at the weights that sampled, so the
        ratio starts at 1 and its clipping acts on the update's drift only, not on the
        sampler's numerics (vLLM kernels and precision, top-p renormalisation); verl
        recomputes ``old_log_prob`` with its actor for the same reason. Logs
        ``rollout/logprob_gap``: mean |sampler - learner| over the generated tokens whose
        sampler log-prob is finite (both at the batch's recorded temperature)."""
        if not self.cfg.rollout.recomputes_old_logprobs:
            return {}
        self.policy.eval()
        with torch.no_grad():
            learner = self.policy.logprobs(batch).to(batch.old_logprobs.device)
        gap = _logprob_gap(batch.old_logprobs, learner, batch.action_mask)
        batch.old_logprobs = learner
        return {"rollout/logprob_gap": float(gap)}

    def estimate(self, batch: RolloutBatch, *, extra: dict[str, Any] | None = None) -> torch.Tensor:
        """(B, T) token advantages from the configured estimator; ``extra`` goes to
        ``AdvantageInputs.extra`` (PRIME: ``{"process_rewards": (B, T)}``; MatchTIR:
        ``{"matchtir_turn_rewards": (B, K), "has_gold": (B,)}``; Durian: ``{"difficulty": (B,)}``)."""
        out = compute_advantages(AdvantageInputs.from_batch(batch, extra=extra), self.cfg.algo.estimator_config)
        return out.advantages.detach()

    def learn(self, batch: RolloutBatch) -> dict[str, float]:
        """estimate -> update. With the ``prime`` estimator, PRIME's PRM is stepped on the
        batch's success labels before its process rewards are computed
        (``algo.prime.update=before``: the rewards come from the updated PRM) or after the
        policy update (``after``: they come from the PRM as it was before this batch).
        Logs ``prime/loss``, ``prime/acc``, ``prime/logit_mean`` and ``prime/reward_mean``.
        ``matchtir`` and ``durian_grpo`` read their turn rewards / difficulty from what
        ``score`` kept (``mmgym.trainer.estimator_inputs.estimator_extra``)."""
        if self.cfg.algo.estimator.estimator != "prime":
            extra, metrics = estimator_extra(batch, self.cfg.algo)
            return {**metrics, **self.update(batch, self.estimate(batch, extra=extra))}
        ref_lp = self._reference_logprobs(batch, needed=True)  # shared with the KL term
        prm = self._process_reward_model()
        metrics: dict[str, float] = {}
        if self.cfg.algo.prime.update == "before":
            metrics.update(prm.step(batch, ref_lp))
        rewards, reward_metrics = prm.process_rewards(batch, ref_lp)
        metrics.update(reward_metrics)
        metrics.update(self.update(batch, self.estimate(batch, extra={"process_rewards": rewards})))
        if self.cfg.algo.prime.update == "after":
            metrics.update(prm.step(batch, ref_lp))
        return metrics

    def _process_reward_model(self) -> ImplicitPRM:
        """PRIME's PRM: restored from the checkpoint, or (first use) a copy of the frozen
        reference -- the weights RL started from -- training what the policy trains."""
        if self.prm is None:
            if self.ref is None:
                self.ref = self._frozen_reference()
            model = self.ref.clone(name="prm")
            for p, q in zip(model.model.parameters(), self.policy.model.parameters(), strict=True):
                p.requires_grad_(q.requires_grad)
            self.prm = ImplicitPRM(model, self.cfg.algo.prime, minibatch_size=self.cfg.algo.minibatch_size,
                                   weight_decay=self.cfg.optim.weight_decay)
        return self.prm

    def update(self, batch: RolloutBatch, adv: torch.Tensor) -> dict[str, float]:
        """PPO epochs over minibatches: clipped policy loss (+ KL to the reference), with
        the configured token weights multiplied into the advantages of the policy term."""
        algo = self.cfg.algo
        loss_fn = POLICY_LOSSES.get(algo.loss.policy_loss)
        needs = _TW_NEEDS.get(algo.token_weights.name, _TW_DEFAULT_NEEDS)
        ref_lp = self._reference_logprobs(batch, needed="ref_logprobs" in needs)
        fixed_w, tw_stats = self._batch_token_weights(batch, needs)  # before train(): no dropout
        stats: dict[str, list[float]] = {k: [v] for k, v in tw_stats.items()}
        self.policy.train()
        B = batch.batch_size
        for _epoch in range(algo.ppo_epochs):
            order = self.rng.permutation(B)
            for lo in range(0, B, algo.minibatch_size):
                idx = order[lo: lo + algo.minibatch_size].tolist()
                mb = select_rows(batch, idx)
                logp = self.policy.logprobs(mb)
                mask = mb.action_mask
                mb_adv, tw_m = self._weighted_advantages(adv[idx], mb, logp, None if ref_lp is None else ref_lp[idx],
                                                         None if fixed_w is None else fixed_w[idx], needs)
                per_tok, m = loss_fn(logp, mb.old_logprobs, mb_adv, mask, algo.loss)
                m = dict(m, **tw_m)
                if ref_lp is not None and algo.loss.kl_coef > 0:
                    kl = kl_penalty(logp, ref_lp[idx], algo.loss.kl_kind)
                    per_tok = per_tok + algo.loss.kl_coef * kl
                    m = dict(m, kl=aggregate(kl, mask, "token_mean"))
                loss = aggregate(per_tok, mask, algo.loss.agg_mode, norm_length=algo.loss.norm_length)
                if self._apply(loss):
                    for k, v in m.items():
                        stats.setdefault(k, []).append(float(v.detach()) if isinstance(v, torch.Tensor) else float(v))
                    stats.setdefault("loss", []).append(float(loss.detach()))
        self.policy.eval()
        return {k: float(np.mean(v)) for k, v in stats.items()}

    # ------------------------------------------------------------------ token weights
    def _batch_token_weights(self, batch: RolloutBatch, needs: frozenset[str]) -> tuple[torch.Tensor | None, dict[str, float]]:
        """(B, T) weights of a weighting that does not read the current log-probs (vppo,
        tor), computed once per update; None (and no work) for ``none`` and for the
        per-minibatch weightings. VPPO reads the policy's distributions with and without
        the images at the generated positions only, packed (B, A, V), then unpacked."""
        tw = self.cfg.algo.token_weights
        if tw.name == "none" or "logprobs" in needs:
            return None, {}
        perception = self._perception_mask(batch) if "perception_mask" in needs else None
        if "image_logits" not in needs:
            inputs = TokenWeightInputs(action_mask=batch.action_mask, perception_mask=perception, group_ids=batch.group_ids)
            w, m = compute_token_weights(inputs, tw)
            return w, self._tw_metrics(m, needs)
        with_img = self.policy.token_distributions(batch, blank_images=False)
        without = self.policy.token_distributions(batch, blank_images=True)
        dev = with_img.device  # (B, A, V) stays where the model put it
        positions, valid = (x.to(dev) for x in action_positions(batch.action_mask))
        if perception is not None:
            perception = torch.cat([perception, perception.new_zeros(batch.batch_size, 1)], 1).to(dev).gather(1, positions)
        inputs = TokenWeightInputs(action_mask=valid, perception_mask=perception, group_ids=batch.group_ids.to(dev),
                                   logits_with_image=with_img, logits_without_image=without)
        packed, m = compute_token_weights(inputs, tw)
        T = batch.input_ids.shape[1]
        w = packed.new_zeros(batch.batch_size, T + 1).scatter_(1, positions, packed)[:, :T]  # column T: padding
        return w, self._tw_metrics(m, needs)

    def _weighted_advantages(self, adv: torch.Tensor, mb: RolloutBatch, logp: torch.Tensor, ref_lp: torch.Tensor | None,
                             fixed_w: torch.Tensor | None, needs: frozenset[str]) -> tuple[torch.Tensor, dict[str, float]]:
        """The minibatch's advantages (n, T) times its token weights: ``fixed_w`` when the
        weights were computed for the whole batch, else the weighting run now on the
        minibatch with its current log-probs (detached; before the update's first step
        they equal the sampler's up to numerics) and old/reference log-probs."""
        tw = self.cfg.algo.token_weights
        if fixed_w is not None:
            return adv * fixed_w.to(adv.device), {}
        if tw.name == "none":
            return adv, {}
        inputs = TokenWeightInputs(
            action_mask=mb.action_mask, logprobs=logp.detach(), old_logprobs=mb.old_logprobs, ref_logprobs=ref_lp,
            perception_mask=self._perception_mask(mb) if "perception_mask" in needs else None, group_ids=mb.group_ids)
        w, m = compute_token_weights(inputs, tw)
        return adv * w.to(adv.device), self._tw_metrics(m, needs)

    def _tw_metrics(self, metrics: dict[str, torch.Tensor], needs: frozenset[str]) -> dict[str, float]:
        """``tw/``-prefixed floats. ``tw/extra_forwards`` counts whole-batch forwards beyond
        the training and KL-reference ones: the weighting's own (VPPO: without the images)
        plus the trainer's (VPPO's with-image forward, since the training forward keeps no
        (B, T, V) logits; the reference forward when only delta_logp needs it)."""
        own = int("image_logits" in needs) + int("ref_logprobs" in needs and self.cfg.algo.loss.kl_coef <= 0)
        out = {f"tw/{k}": float(v) for k, v in metrics.items()}
        out["tw/extra_forwards"] = out.get("tw/extra_forwards", 0.0) + own
        return out

    @staticmethod
    def _perception_mask(batch: RolloutBatch) -> torch.Tensor:
        """(B, T) bool: generated tokens of turns whose reply made a tool call. The image
        and video tools (zoom, crop_video, get_frames, zoom_frame) look at the picture, so
        these are ToR's perception tokens and the other replies reasoning tokens. Tools
        that do not look (ask, navigate, refer in the non-image envs) count too."""
        if batch.tool_turns is None:
            raise ValueError("token weighting 'tor' needs RolloutBatch.tool_turns (B, K), which "
                             "mmgym.agents.tokens.build_rollout_batch fills from Turn.tool_calls")
        return broadcast_turn_values(batch.tool_turns, batch.token_turn, batch.action_mask).bool()

    def _reference_logprobs(self, batch: RolloutBatch, *, needed: bool = False) -> torch.Tensor | None:
        """(B, T) log-probs under the frozen warm-start policy: for the KL term, or when a
        token weighting or PRIME reads them (``needed``) even with ``kl_coef`` 0; else None.
        Computed once per batch (kept in ``batch.ref_logprobs``)."""
        if self.cfg.algo.loss.kl_coef <= 0 and not needed:
            return None
        if batch.ref_logprobs is None:
            if self.ref is None:
                self.ref = self._frozen_reference()
            with torch.no_grad():
                batch.ref_logprobs = self.ref.logprobs(batch)
        return batch.ref_logprobs

    def _frozen_reference(self) -> HFPolicy:
        """The weights RL started from (the warm start), frozen: a copy of the policy when
        built at the first RL update; after a resume past it, reloaded from the configured
        model (or, after an SFT phase, its checkpoint ``step_0000000``) since the policy has
        moved on -- unless that checkpoint was rotated out (then the resumed policy, warned)."""
        start: HFPolicy | None = None
        if self.state.iteration > 0:
            path = self.run.ckpt_root / "step_0000000" / "model" if self.cfg.sft.enabled else None
            if path is None or path.is_dir():
                start = build_policy(self.cfg, path)
            else:
                log.warning("the warm start (checkpoint step_0000000) is no longer kept; the reference for KL/PRIME "
                            "is the resumed policy (keep_warm_start=true keeps it)")
        ref = start if start is not None else self.policy.clone(name="reference")
        for p in ref.model.parameters():
            p.requires_grad_(False)
        return ref.eval()

    def _apply(self, loss: torch.Tensor) -> bool:
        """Backward + clip + step, unless the loss is not finite (then skip and count)."""
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            self.state.bad_updates += 1
            self.state.skipped_updates += 1
            log.warning("non-finite loss (%s); update skipped (%d in a row)", float(loss), self.state.bad_updates)
            self.log(self.state.iteration, {"skipped_update": 1.0, "bad_updates_in_a_row": float(self.state.bad_updates)}, "event")
            if self.state.bad_updates >= self.cfg.max_bad_updates:
                raise TrainingDiverged(f"{self.state.bad_updates} non-finite losses in a row; the last good checkpoint is in {self.run.ckpt_root}")
            return False
        self.state.bad_updates = 0
        if self.learner is not None:
            self.learner.step(loss)
        else:
            backward_step(self.policy, self.optimizer, loss, self.cfg.optim.grad_clip)
        return True

    # ------------------------------------------------------------------ evaluation & driver
    def evaluate(self, step: int, tag: str | None = None) -> dict[str, float]:
        cfg = self.cfg
        pages = self.run.episodes / f"step_{step:07d}" if dist_utils.is_main() else None
        metrics, _ = evaluate(self.policy, cfg.env.id, self.env_kwargs, episodes=cfg.env.eval_episodes,
                              max_new_tokens=cfg.rollout.max_new_tokens, system_prompt=cfg.rollout.system_prompt,
                              tool_schemas=cfg.rollout.tool_schemas, pages_dir=pages, pages=cfg.sample_episodes, progress=self.progress)
        self.log(step, metrics, "eval")
        if tag:
            self.state.evals[tag] = metrics["success"]
        if dist_utils.is_main():
            self.run.plot()
        return metrics

    def rl(self) -> None:
        cfg = self.cfg
        if self.state.iteration == 0 and "warm_start" not in self.state.evals:
            self.evaluate(0, "warm_start")
        if self.state.iteration >= cfg.iterations:
            return
        self.sync_rollout()  # the engine starts from the learner's weights, not the folder's
        pool_kwargs: dict[str, Any] = {"num_workers": cfg.env.workers, "step_timeout_s": cfg.env.step_timeout_s}
        if cfg.env.backend == "ray":
            pool_kwargs["address"] = cfg.env.address
        self.collector = RolloutCollector(cfg.env.id, num_tasks=cfg.rollout.tasks_per_iter, group_size=cfg.rollout.group_size,
                                          env_kwargs=self.env_kwargs, backend=cfg.env.backend,
                                          pool_kwargs=pool_kwargs if cfg.env.backend != "local" else None)
        its = range(self.state.iteration, cfg.iterations)
        if self.progress:
            from tqdm import tqdm

            its = tqdm(its, desc="rl", unit="it", initial=self.state.iteration, total=cfg.iterations)
        try:
            for it in its:
                metrics = self.iteration(it)
                self.state.iteration = it + 1
                self.log(it + 1, metrics, "rl")
                if self.progress:
                    its.set_postfix(reward=f"{metrics['reward_mean']:.2f}", success=f"{metrics['success']:.2f}")
                if cfg.env.eval_every and (it + 1) % cfg.env.eval_every == 0 and it + 1 < cfg.iterations:
                    self.evaluate(it + 1)
                if (it + 1) % cfg.checkpoint_every == 0:
                    self.checkpoint(it + 1)
                    if dist_utils.is_main():
                        self.run.plot()
        finally:
            self.collector.close()

    def iteration(self, it: int) -> dict[str, float]:
        """One RL iteration: collect -> score -> (learner's old log-probs) -> estimate ->
        update, then the updated weights go to the rollout engine (vLLM)."""
        cfg = self.cfg
        self._set_lr(self._lr_at(it, cfg.iterations, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule))
        t0 = time.perf_counter()
        trajs, task_ids = self.collect(it)
        t1 = time.perf_counter()
        batch, metrics = self.score(trajs, task_ids)
        if batch is not None:
            metrics.update(self.refresh_old_logprobs(batch))
            metrics.update(self.learn(batch))
        metrics.update(collect_s=t1 - t0, update_s=time.perf_counter() - t1, lr=self.optimizer.param_groups[0]["lr"])
        if batch is not None:  # no update, no new weights
            metrics.update(self.sync_rollout())
        return metrics

    def fit(self) -> dict[str, Any]:
        """Run what is left of the run: warm start, RL, final evaluation."""
        if self.state.phase == "sft":
            if self.cfg.sft.steps > 0:
                self.sft()
            self.state.phase = "rl"
            self.optimizer = self._make_optimizer(self.cfg.optim.lr)
            self.checkpoint(0)
            if dist_utils.is_main():
                self.run.drop_checkpoints("sft")  # superseded: a resume from here on starts at step_0000000 or later
        if self.state.phase == "rl":
            self.rl()
            if self.cfg.iterations == 0:  # a warm start only: its evaluation is the final one
                final = {"success": self.state.evals.get("warm_start", 0.0)}
            else:
                final = self.evaluate(self.state.iteration, "final")
            if self.world > 1:
                self.log(self.state.iteration, {"ranks_in_sync": float(dist_utils.params_in_sync(self.policy.model)), "world_size": float(self.world)}, "dist")
            self.state.phase = "done"
            self.checkpoint(self.state.iteration)
            return {"run_dir": str(self.run.path), **{f"eval/{k}": v for k, v in final.items()}, **self.state.evals}
        return {"run_dir": str(self.run.path), **self.state.evals}


def context_mask(batch: RolloutBatch, suppress_token_ids: Sequence[int]) -> torch.Tensor:
    """(B, T) bool: the real tokens of ``batch`` that the policy did not generate and could
    generate (not a vision token or other suppressed id), after each row's first token (which
    has no prefix to be predicted from): the context text of ``sft.observation_loss``."""
    ids = batch.input_ids
    mask = batch.attention_mask.bool() & ~batch.action_mask.bool()
    if suppress_token_ids:
        mask &= ~torch.isin(ids, torch.as_tensor(list(suppress_token_ids), dtype=ids.dtype, device=ids.device))
    mask[:, 0] = False
    return mask


def _logprob_gap(sampler: torch.Tensor, learner: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """Scalar mean |sampler - learner| of (B, T) log-probs over ``action_mask`` tokens whose
    sampler log-prob is finite (vLLM records NaN for a token it returned no log-prob for);
    0 when there is none."""
    mask = action_mask.to(sampler.device) & torch.isfinite(sampler)
    diff = (sampler - learner.to(sampler.device)).abs()
    return torch.where(mask, diff, torch.zeros((), dtype=diff.dtype)).sum() / mask.sum().clamp(min=1)


def train(cfg: TrainConfig, *, resume: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Create (or resume) a run folder and train. Returns a summary dict."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars; no per-load/save bars from transformers
    owns_group = not torch.distributed.is_initialized()  # made here (torchrun, DeepSpeed): destroyed here
    dist_utils.init_from_env()
    if resume is not None:
        run = RunDir.open_for_resume(Path(resume))
    else:
        cfg = cfg.with_resolved_env()  # config.yaml records the task itself, not "the default"
        name = cfg.run_name or time.strftime("%Y%m%d-%H%M%S") + f"-s{cfg.seed}"
        path = Path(cfg.out_root) / name
        run = RunDir.create(path, cfg) if dist_utils.is_main() else RunDir(path)
        dist_utils.barrier()
    try:
        summary = Trainer(cfg, run, progress=progress).fit()
    finally:
        run.close()
    if owns_group:
        dist_utils.shutdown()
    return summary
