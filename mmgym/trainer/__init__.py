"""mmgym.trainer: warm start + multi-turn RL (collect -> score -> estimate -> update),
run folders with atomic checkpoints, metrics, curves and episode pages."""

from mmgym.trainer.config import TrainConfig
from mmgym.trainer.loop import Trainer, TrainingDiverged, train

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "train"]
