"""``rollout.backend=vllm`` in the trainer, on the CPU with the fake engine of
tests/agents/fake_vllm.py: rollouts come from the engine, the learner's weights are pushed
into it after every update, old log-probs are the learner's, and the config and the
missing-extra error say what is wrong."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from mmgym.agents import vllm_backend
from mmgym.core import ConfigError, load_config
from mmgym.trainer import TrainConfig
from mmgym.trainer.loop import Trainer
from mmgym.trainer.run_dir import RunDir

HAS_VLLM = importlib.util.find_spec("vllm") is not None

# The embedded warm start, no SFT, one evaluation episode, 2 iterations of 2 tasks x 2.
VLLM = ("iterations=2", "checkpoint_every=2", "rollout.backend=vllm")  # on top of conftest.IN_PROCESS_TINY


def _fake_vllm() -> ModuleType:
    """tests/agents/fake_vllm.py (tests/agents is not on sys.path from here)."""
    if "fake_vllm" not in sys.modules:
        spec = importlib.util.spec_from_file_location("fake_vllm", Path(__file__).resolve().parents[1] / "agents" / "fake_vllm.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules["fake_vllm"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["fake_vllm"]



def test_config_rejects_an_unknown_backend_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"unknown rollout.backend 'vlm'; choose one of: hf, vllm"):
        load_config(TrainConfig, overrides=["rollout.backend=vlm"])
    with pytest.raises(ConfigError, match=r"rollout.gpu_memory_utilization .* \(0, 1\], got 1.5"):
        load_config(TrainConfig, overrides=["rollout.backend=vllm", "rollout.gpu_memory_utilization=1.5"])
    with pytest.raises(ConfigError, match="rollout.tensor_parallel_size must be >= 1"):
        load_config(TrainConfig, overrides=["rollout.backend=vllm", "rollout.tensor_parallel_size=0"])
    # the learner recomputes old log-probs by default with vLLM only; an explicit value wins
    assert TrainConfig().rollout.backend == "hf" and not TrainConfig().rollout.recomputes_old_logprobs
    assert load_config(TrainConfig, overrides=["rollout.backend=vllm"]).rollout.recomputes_old_logprobs
    off = load_config(TrainConfig, overrides=["rollout.backend=vllm", "rollout.recompute_old_logprobs=false"])
    assert not off.rollout.recomputes_old_logprobs


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed")
def test_missing_vllm_fails_when_the_trainer_is_built_naming_the_extra(tmp_path: Path, tiny_config) -> None:
    cfg = tiny_config(tmp_path, *VLLM)
    with pytest.raises(ImportError, match=r"pip install 'mmgym\[vllm\]'"):
        Trainer(cfg, RunDir.create(tmp_path / "run", cfg), progress=False)


def _weights(tr: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tr.policy.model.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_vllm_run_samples_with_the_engine_and_pushes_weights_after_each_update(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_config) -> None:
    fake = _fake_vllm()
    module = fake.fake_vllm_module()
    monkeypatch.setattr(vllm_backend, "import_vllm", lambda: module)
    cfg = tiny_config(tmp_path, *VLLM, "run_name=vllm", "rollout.gpu_memory_utilization=0.3", "rollout.max_images_per_prompt=3")
    tr = Trainer(cfg, RunDir.create(tmp_path / "vllm", cfg), progress=False)
    (engine,) = module.engines
    assert engine.kwargs["gpu_memory_utilization"] == 0.3 and engine.kwargs["limit_mm_per_prompt"] == {"image": 3}

    start = _weights(tr)
    after_update: list[dict[str, torch.Tensor]] = []
    gaps: list[float] = []
    refresh, learn = tr.refresh_old_logprobs, tr.learn

    def checked_refresh(batch):  # old log-probs: the engine's before, the learner's after
        sampled = batch.old_logprobs[batch.action_mask]
        assert sampled.numel() > 0 and torch.all(sampled == fake.LOGPROB)
        m = refresh(batch)
        learner = batch.old_logprobs[batch.action_mask]
        assert not torch.all(learner == fake.LOGPROB)
        gaps.append(float((learner - fake.LOGPROB).abs().mean()))
        return m

    def recording_learn(batch):
        m = learn(batch)
        after_update.append(_weights(tr))
        return m

    monkeypatch.setattr(tr, "refresh_old_logprobs", checked_refresh)
    monkeypatch.setattr(tr, "learn", recording_learn)
    tr.fit()
    tr.run.close()

    # one push before the first rollout, then one after each of the 2 updates, each the
    # learner's weights of that moment (which the updates changed)
    assert len(engine.pushes) == 3 and engine.resets == 3
    assert _equal(engine.pushes[0], start)
    assert len(after_update) == 2
    assert _equal(engine.pushes[1], after_update[0]) and _equal(engine.pushes[2], after_update[1])
    assert not _equal(after_update[0], start) and not _equal(after_update[1], after_update[0])
    assert engine.calls >= 2  # the RL rollouts sampled from the engine (evaluation stays on HF)

    rows = [json.loads(x) for x in (tmp_path / "vllm" / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in rows if r["phase"] == "rl"]
    assert len(rl) == 2 and all("loss" in r for r in rl)
    for r, gap in zip(rl, gaps):
        assert math.isfinite(r["rollout/sync_s"]) and r["rollout/sync_s"] >= 0
        assert r["rollout/logprob_gap"] == pytest.approx(gap, rel=1e-5) and r["rollout/logprob_gap"] > 0
