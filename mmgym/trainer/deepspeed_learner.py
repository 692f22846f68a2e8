"""The learner under DeepSpeed ZeRO (``learner.strategy=deepspeed``, extra ``deepspeed``).

Launched like the DDP learner: ``torchrun --nproc-per-node N -m mmgym.cli train
learner.strategy=deepspeed ...`` (or one process without torchrun). ``deepspeed.initialize``
wraps the policy's HF model and the trainer's own ``torch.optim.AdamW`` -- so no
DeepSpeed optimizer op is compiled -- in a ZeRO engine: stage 1 partitions AdamW's state
(fp32 master weights and both moments) across the data-parallel ranks, stage 2 the
averaged gradients too. Every rank still holds the full weights, so rollouts, the frozen
reference, evaluation and the vLLM weight push read the model exactly as under DDP; only
``backward -> average over ranks -> clip -> step`` moves into ``engine.backward`` and
``engine.step``, one optimizer step per call as in ``common.backward_step``. The
reduction follows the backward's order, so every rank's minibatch must use the same
parameters (true when every episode shows an image, as in the shipped envs).

ZeRO-3 (parameters partitioned too) is refused by the config: each rank generates its own
multi-turn rollouts, a different number of forwards per rank, and every ZeRO-3 forward
gathers parameters with collectives that must match across ranks; the frozen reference
(a copy of the policy) and ``save_pretrained`` on rank 0 would also see only shards.

Checkpoints stay atomic and their ``model/`` folder plain transformers: each rank writes
its optimizer shard (DeepSpeed's own ZeRO state dict) to ``zero/rank_XXXXX.pt`` in a
staging folder next to the checkpoints; rank 0 moves the shards into the checkpoint's
temporary folder before it is fsynced and renamed, and ``optim.pt`` records the ZeRO
stage and world size. A resume needs the same number of ranks.

On a CPU-only machine DeepSpeed picks its CPU accelerator (gloo) and compiles its
shared-memory all-reduce op once (about a minute and a half on two busy cores; cached
under ``~/.cache/torch_extensions``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mmgym.agents import HFPolicy
from mmgym.trainer import distributed as dist_utils

__all__ = ["DeepSpeedLearner", "import_deepspeed", "SHARD_DIR"]

log = logging.getLogger(__name__)

SHARD_DIR = "zero"
"""Folder of a checkpoint holding one ZeRO optimizer shard per rank."""


def import_deepspeed() -> Any:
    """``import deepspeed`` or one clear error naming the extra to install. DeepSpeed's
    logger is moved to stderr, so the CLI's stdout stays the run summary (JSON)."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed
    except ImportError as e:
        raise ImportError("learner.strategy=deepspeed needs DeepSpeed, which is not installed: "
                          "pip install 'mmgym[deepspeed]' (or use learner.strategy=ddp)") from e
    for h in deepspeed.utils.logger.handlers:
        if isinstance(h, logging.StreamHandler) and h.stream is sys.stdout:
            h.setStream(sys.stderr)
    deepspeed.utils.logger.setLevel(max(deepspeed.utils.logger.level, logging.WARNING))
    return deepspeed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _init_distributed(deepspeed: Any) -> None:
    """Join the process group torchrun set up (``distributed.init_from_env`` already made
    it under ``mmgym train``), or make a one-rank group for a plain single process:
    DeepSpeed needs one, and reads ``LOCAL_RANK`` for its device."""
    if not dist.is_initialized():
        for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(k, v)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints its comm op's build
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def engine_config(policy: HFPolicy, *, zero_stage: int, grad_clip: float) -> dict[str, Any]:
    """The DeepSpeed config: one micro-batch and no accumulation (the trainer calls the
    engine once per optimizer step with its minibatch loss), clipping at ``grad_clip``,
    bf16 mixed precision (fp32 master weights) when the model is in bfloat16."""
    dtypes = {p.dtype for p in policy.parameters()}
    if torch.float16 in dtypes:
        raise ValueError("learner.strategy=deepspeed: the model's weights are float16, whose loss scaling skips steps on "
                         "overflow; load the model in bfloat16 or float32")
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(grad_clip),
        "zero_optimization": {"stage": int(zero_stage)},
        "bf16": {"enabled": torch.bfloat16 in dtypes},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _check_device(policy: HFPolicy) -> None:
    """DeepSpeed moves the model to its accelerator's device for this rank (``LOCAL_RANK``);
    the policy must send its inputs there too."""
    moved, want = next(policy.model.parameters()).device, torch.device(policy.device)
    if moved.type != want.type or None not in (moved.index, want.index) and moved.index != want.index:
        raise ValueError(f"learner.strategy=deepspeed moved the model to {moved}, but model.device resolved to {want}; "
                         "set model.device=auto")


class DeepSpeedLearner:
    """A ZeRO engine around ``policy.model`` and ``optimizer`` (a torch AdamW over the
    trainable parameters). The policy keeps calling its own model; the engine only owns
    the backward's reduction, the clip and the step.

    Args:
        policy: the learner (its model is moved to this rank's device by DeepSpeed).
        optimizer: the trainer's AdamW; its ``param_groups`` stay the ones the engine's
            optimizer steps, so learning-rate changes made there reach it.
        zero_stage: 1 or 2.
        grad_clip: max global gradient norm (``optim.grad_clip``).
    """

    def __init__(self, policy: HFPolicy, optimizer: torch.optim.Optimizer, *, zero_stage: int, grad_clip: float):
        if zero_stage not in (1, 2):
            raise ValueError(f"learner.zero_stage must be 1 or 2, got {zero_stage}")
        t0 = time.perf_counter()
        deepspeed = import_deepspeed()
        _init_distributed(deepspeed)
        self.zero_stage = int(zero_stage)
        self.rank, self.world = dist_utils.rank_and_world()
        config = engine_config(policy, zero_stage=zero_stage, grad_clip=grad_clip)
        with contextlib.redirect_stdout(sys.stderr):
            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=policy.model, optimizer=optimizer, config=config)
        self.base_optimizer = optimizer
        _check_device(policy)
        log.info("DeepSpeed ZeRO-%d engine on %d rank(s) ready in %.1f s", self.zero_stage, self.world, time.perf_counter() - t0)

    def step(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` with the gradients reduced (ZeRO-2: reduce-scattered) and
        averaged over ranks, then the clip and one AdamW step on this rank's partition,
        whose updated weights are all-gathered into every rank's model; gradients zeroed."""
        self.engine.backward(loss)
        self.engine.step()

    def reset_optimizer(self, lr: float) -> Any:
        """A fresh AdamW at ``lr`` (the trainer's new optimizer after the warm start): the
        moments and step counts cleared, the same engine. Returns the engine's optimizer."""
        self.base_optimizer.state.clear()
        for g in self.base_optimizer.param_groups:
            g["lr"] = lr
        return self.optimizer

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What ``optim.pt`` records under ``optimizer``: where the state is, not the state."""
        return {"deepspeed": {"zero_stage": self.zero_stage, "world_size": self.world, "shards": SHARD_DIR}}

    @staticmethod
    def staging(ckpt_root: Path, step: int) -> Path:
        """Where the ranks put their shards of checkpoint ``step`` before rank 0 adopts them;
        named like ``RunDir``'s temporary folders, which a later save sweeps when stale."""
        return ckpt_root / f".tmp_step_{step:07d}_zero"

    def write_shard(self, ckpt_root: Path, step: int) -> None:
        """Every rank: its optimizer shard into the staging folder (temp file + rename),
        then a barrier, so rank 0 finds all of them."""
        folder = self.staging(ckpt_root, step)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"rank_{self.rank:05d}.pt"
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.optimizer.state_dict(), tmp)
        os.replace(tmp, path)
        dist_utils.barrier()

    def adopt_shards(self, ckpt_root: Path, step: int, folder: Path) -> None:
        """Rank 0, inside ``RunDir.save_checkpoint``: move the ``world`` shards from the
        staging folder into ``folder/zero`` (fsynced and renamed with the checkpoint)."""
        staging = self.staging(ckpt_root, step)
        (folder / SHARD_DIR).mkdir()
        for r in range(self.world):
            name = f"rank_{r:05d}.pt"
            if not (staging / name).is_file():
                raise FileNotFoundError(f"rank {r} wrote no ZeRO optimizer shard to {staging}; is {ckpt_root} on a "
                                        "filesystem every rank shares?")
            os.replace(staging / name, folder / SHARD_DIR / name)
        shutil.rmtree(staging, ignore_errors=True)

    def load(self, ckpt: Path, recorded: dict[str, Any]) -> None:
        """Every rank: its own shard of checkpoint ``ckpt`` (``recorded``: what ``optim.pt``
        holds under ``optimizer``) into the engine's optimizer, fp32 master weights included."""
        meta = recorded.get("deepspeed") if isinstance(recorded, dict) else None
        if meta is None:
            raise ValueError(f"checkpoint {str(ckpt)!r} holds a plain torch optimizer state (learner.strategy=ddp), "
                             "not ZeRO shards; resume it with learner.strategy=ddp")
        if meta["world_size"] != self.world:
            raise ValueError(f"checkpoint {str(ckpt)!r} holds ZeRO optimizer shards for {meta['world_size']} ranks; resume "
                             f"it with torchrun --nproc-per-node {meta['world_size']} (this run has {self.world})")
        shards: list[Any] = [None] * self.world  # DeepSpeed reads only this rank's entry of a same-size resume
        shards[self.rank] = torch.load(ckpt / meta["shards"] / f"rank_{self.rank:05d}.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(shards, load_optimizer_states=True, load_from_fp32_weights=True)
