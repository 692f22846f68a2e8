"""Data-parallel learner over ``torch.distributed`` (gloo on CPU, nccl on GPU).

Launched by ``torchrun --nproc-per-node N -m mmgym.cli train ...``: every rank collects
its own rollouts (its own task seeds), computes its loss, and gradients are averaged
across ranks before each optimizer step, so all ranks keep identical weights. Rank 0
alone writes the run folder.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["init_from_env", "rank_and_world", "is_main", "average_gradients", "barrier", "params_in_sync", "shutdown"]


def init_from_env() -> None:
    """Initialise the process group when launched by torchrun (``WORLD_SIZE`` > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_world()[0] == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Barrier, then destroy the process group, while the interpreter is fully alive: a
    Gloo group left to the interpreter's exit can abort it ("terminate called without an
    active exception", pytorch/pytorch#190489) when its worker threads still hold async
    work, as DeepSpeed's reductions leave them."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def average_gradients(model: torch.nn.Module) -> None:
    """All-reduce every gradient and divide by the world size (no-op on one process)."""
    rank, world = rank_and_world()
    if world == 1:
        return
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)


def params_in_sync(model: torch.nn.Module) -> bool:
    """True iff every rank holds the same weights (compares a float64 fingerprint)."""
    rank, world = rank_and_world()
    if world == 1:
        return True
    fp = torch.zeros(2, dtype=torch.float64)
    for i, p in enumerate(model.parameters()):
        v = p.detach().double()
        fp[0] += v.sum()
        fp[1] += (v * (1 + (torch.arange(v.numel(), dtype=torch.float64).reshape(v.shape) % 97) / 97)).sum() * (i + 1)
    gathered = [torch.zeros_like(fp) for _ in range(world)]
    dist.all_gather(gathered, fp)
    return all(torch.equal(g, gathered[0]) for g in gathered)
