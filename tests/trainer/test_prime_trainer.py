"""PRIME in the trainer: the ``algo.prime`` section, tiny in-process runs with the
``prime`` estimator (PRM trained, reference frozen, ``update`` before/after ordering) and
a resume that restores the PRM and its optimizer."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mmgym.agents import HFPolicy
from mmgym.algos import PrimeEstimatorConfig
from mmgym.core import ConfigError, load_config
from mmgym.trainer import TrainConfig
from mmgym.trainer.common import model_dir
from mmgym.trainer.loop import Trainer
from mmgym.trainer.prime import ImplicitPRM
from mmgym.trainer.run_dir import RunDir

# The embedded warm start, no SFT, one held-out episode, 2 tasks x 2 episodes per iteration.
PRIME = ("checkpoint_every=1", "algo.estimator.estimator=prime")  # on top of conftest.IN_PROCESS_TINY
PRIME_KEYS = {"prime/loss", "prime/acc", "prime/logit_mean", "prime/reward_mean"}



def _record_order(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Wrap the PRM step, its rewards and the policy update to record the order they run in."""
    calls: list[str] = []
    for owner, name in ((ImplicitPRM, "step"), (ImplicitPRM, "process_rewards"), (Trainer, "update")):
        def wrapper(self, *args, _orig=getattr(owner, name), _name=name, **kwargs):
            calls.append(_name)
            return _orig(self, *args, **kwargs)
        monkeypatch.setattr(owner, name, wrapper)
    return calls


def _run(cfg: TrainConfig, name: str) -> tuple[Trainer, list[dict], list[str]]:
    """Fit a fresh run in-process; return the trainer, its RL metric rows and the call order."""
    with pytest.MonkeyPatch.context() as mp:
        calls = _record_order(mp)
        tr = Trainer(cfg, RunDir.create(Path(cfg.out_root) / name, cfg), progress=False)
        tr.fit()
    tr.run.close()
    rows = [json.loads(x) for x in (Path(cfg.out_root) / name / "metrics.jsonl").read_text().splitlines()]
    return tr, [r for r in rows if r["phase"] == "rl"], calls


def _state(policy: HFPolicy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in policy.model.state_dict().items()}


@pytest.fixture(scope="module")
def before_run(tmp_path_factory: pytest.TempPathFactory, tiny_config) -> Iterator[tuple[Trainer, list[dict], list[str]]]:
    """Two iterations with the default ``update=before`` (and the KL term on)."""
    cfg = tiny_config(tmp_path_factory.mktemp("prime"), *PRIME, "iterations=2")
    yield _run(cfg, "before")


# --------------------------------------------------------------------------- config


def test_config_section_defaults_and_estimator_config() -> None:
    cfg = load_config(TrainConfig, overrides=["algo.estimator.estimator=prime", "algo.prime.update=after", "algo.prime.beta=0.1"])
    p = cfg.algo.prime
    assert (p.update, p.beta, p.process_coef, p.outcome_coef) == ("after", 0.1, 5.0, 5.0)
    assert p.lr > 0 and p.grad_clip == 10.0
    est = cfg.algo.estimator_config
    assert isinstance(est, PrimeEstimatorConfig) and est.prime is p and est.estimator == "prime"
    other = load_config(TrainConfig, overrides=["algo.estimator.estimator=grpo"]).algo
    assert other.estimator_config is other.estimator  # other estimators are called as before


@pytest.mark.parametrize("override,needle", [
    ("algo.prime.beta=0", "beta must be > 0"),
    ("algo.prime.beta=-0.05", "beta must be > 0"),
    ("algo.prime.update=during", "'algo.prime.update': 'during' is not one of 'before', 'after'"),
    ("algo.prime.lr=0", "algo.prime.lr must be > 0"),
    ("algo.prime.grad_clip=-1", "algo.prime.grad_clip must be > 0"),
    ("algo.prime.process_coef=-1", "must be >= 0"),
    ("algo.prime.lrr=1e-3", "unknown config key 'algo.prime.lrr'"),
    ("rollout.group_size=1", "rollout.group_size >= 2"),
])
def test_config_rejects_bad_values(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, overrides=["algo.estimator.estimator=prime", override])
    assert needle in str(err.value)


def test_other_unsupported_estimators_are_still_rejected() -> None:
    with pytest.raises(ConfigError, match="does not compute yet"):
        load_config(TrainConfig, overrides=["algo.estimator.estimator=igpo"])


# --------------------------------------------------------------------------- runs


def test_two_iterations_log_finite_prime_metrics(before_run) -> None:
    _, rl, calls = before_run
    assert len(rl) == 2
    for row in rl:
        assert PRIME_KEYS <= set(row), row
        assert all(math.isfinite(row[k]) for k in PRIME_KEYS), row
        assert 0.0 <= row["prime/acc"] <= 1.0 and row["prime/loss"] > 0
        assert "kl" in row and "loss" in row
    # before: the PRM steps, then scores the batch, then the policy updates
    assert calls == ["step", "process_rewards", "update"] * 2
    # the first step moved the PRM off the reference: its rewards are no longer 0
    assert abs(rl[0]["prime/reward_mean"]) > 0


def test_prm_trained_reference_frozen_at_the_warm_start(before_run) -> None:
    tr, _, _ = before_run
    assert tr.prm is not None and tr.ref is not None
    warm = _state(HFPolicy(model_dir("embedded:focus_warm")))
    ref, prm, policy = _state(tr.ref), _state(tr.prm.model), _state(tr.policy)
    assert ref.keys() == warm.keys() == prm.keys()
    assert all(torch.equal(ref[k], warm[k]) for k in warm)  # the reference never moved
    assert not any(p.requires_grad for p in tr.ref.model.parameters())
    changed = [k for k in warm if not torch.equal(prm[k], warm[k])]
    assert changed and any("visual" in k for k in changed)  # the PRM trains its own vision tower too
    assert any(not torch.equal(prm[k], policy[k]) for k in warm)  # and is not the policy
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(tr.prm.model.model.parameters(), tr.policy.model.parameters()))


def test_update_after_scores_with_the_prm_before_its_step(tmp_path: Path, tiny_config) -> None:
    # kl_coef 0: the reference forward runs for PRIME alone
    cfg = tiny_config(tmp_path, *PRIME, "iterations=1", "algo.prime.update=after", "algo.loss.kl_coef=0")
    tr, rl, calls = _run(cfg, "after")
    assert calls == ["process_rewards", "update", "step"]
    (row,) = rl
    assert PRIME_KEYS <= set(row) and all(math.isfinite(row[k]) for k in PRIME_KEYS)
    assert "kl" not in row
    # the first rewards come from the PRM as it started: a copy of the reference
    assert row["prime/reward_mean"] == pytest.approx(0.0, abs=1e-7)
    assert row["prime/logit_mean"] == pytest.approx(0.0, abs=1e-7)
    ref, prm = _state(tr.ref), _state(tr.prm.model)
    assert any(not torch.equal(prm[k], ref[k]) for k in ref)  # then it stepped


def test_resume_restores_the_prm_and_its_optimizer(before_run) -> None:
    tr, _, _ = before_run
    ckpt = tr.run.latest_checkpoint()
    assert ckpt is not None and ckpt.name == "step_0000002"
    assert {p.name for p in (ckpt / "prm").iterdir()} == {"model.safetensors", "optim.pt"}
    resumed = Trainer(tr.cfg, RunDir.open_for_resume(tr.run.path), progress=False)
    assert resumed.state.iteration == 2 and resumed.prm is not None
    a, b = _state(tr.prm.model), _state(resumed.prm.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [p.requires_grad for p in resumed.prm.model.model.parameters()] == [p.requires_grad for p in tr.prm.model.model.parameters()]
    sa, sb = tr.prm.optimizer.state_dict(), resumed.prm.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"] and sa["state"].keys() == sb["state"].keys() and sa["state"]
    for i, st in sa["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb["state"][i][k])), (i, k)
    # the resumed run's reference is the warm start again, not the resumed policy
    ref = _state(resumed._frozen_reference())
    assert all(torch.equal(ref[k], v) for k, v in _state(tr.ref).items())
    resumed.run.close()
