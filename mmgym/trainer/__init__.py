"""mmgym.trainer: warm start + multi-turn RL (collect -> score -> estimate -> update),
run folders with atomic checkpoints, metrics, curves and episode pages."""

import os

import torch

# accelerate imports deepspeed (when installed) inside every save_pretrained, and deepspeed
# then warns on stdout that it fell back to the CPU; on a machine without CUDA, say so first
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from mmgym.trainer.config import TrainConfig  # noqa: E402
from mmgym.trainer.loop import Trainer, TrainingDiverged, train  # noqa: E402

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "train"]
