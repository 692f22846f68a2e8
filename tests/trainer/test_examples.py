"""Every example config loads (keys and types checked) and names a registered env."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import pytest

import mmgym  # noqa: F401
from mmgym.core import load_config
from mmgym.envs.registration import ENV_IDS
from mmgym.trainer import TrainConfig

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_loads(path: Path) -> None:
    cfg = load_config(TrainConfig, path)
    assert cfg.env.id in ENV_IDS
    env = gym.make(cfg.env.id, **cfg.env.make_kwargs)  # the kwargs fit the env
    env.reset(seed=0)
    env.close()


def test_defaults_are_the_main_job_example() -> None:
    from mmgym.core import to_dict

    main = load_config(TrainConfig, Path(__file__).resolve().parents[2] / "examples" / "focus_grpo.yaml")
    default = TrainConfig()
    assert main.env.make_kwargs == default.env.make_kwargs
    a, b = to_dict(main), to_dict(default)
    a["env"].pop("kwargs"), b["env"].pop("kwargs")
    assert a == b


def test_learner_device_resolution() -> None:
    import torch

    from mmgym.trainer.common import learner_device

    assert learner_device("cpu") == "cpu"
    assert learner_device("auto") == ("cuda:0" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            learner_device("cuda:1")
