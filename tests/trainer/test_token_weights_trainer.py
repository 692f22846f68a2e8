"""Token weights in the trainer: the config section, a tiny in-process run per weighting
that logs ``tw/...``, ``HFPolicy.token_distributions``, and weights that really multiply
the advantage of the policy term."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mmgym.agents import RolloutCollector
from mmgym.agents.tokens import action_positions
from mmgym.algos import visual_dependency
from mmgym.core import ConfigError, RolloutBatch, Trajectory, load_config
from mmgym.trainer import TrainConfig
from mmgym.trainer import loop
from mmgym.trainer.loop import Trainer, train
from mmgym.trainer.run_dir import RunDir

# No warm start (the embedded model is already warm-started), no evaluation beyond one
# episode, one RL iteration of 2 tasks x 2 episodes.
ONE_ITERATION = ("iterations=1", "checkpoint_every=1")  # on top of conftest.IN_PROCESS_TINY
NAMES = ["delta_logp", "fipo", "none", "tor", "vppo"]



@pytest.mark.parametrize("name", NAMES)
def test_config_accepts_every_registered_weighting(name: str) -> None:
    cfg = load_config(TrainConfig, overrides=[f"algo.token_weights.name={name}", "algo.token_weights.vppo_top_frac=0.5"])
    assert cfg.algo.token_weights.name == name and cfg.algo.token_weights.vppo_top_frac == 0.5
    assert TrainConfig().algo.token_weights.name == "none"  # the default changes nothing


def test_config_rejects_an_unknown_weighting_with_the_choices() -> None:
    with pytest.raises(ConfigError, match="unknown token weighting 'vpo'; known: delta_logp, fipo, none, tor, vppo"):
        load_config(TrainConfig, overrides=["algo.token_weights.name=vpo"])
    with pytest.raises(ConfigError, match="unknown config key 'algo.token_weights.nme'"):
        load_config(TrainConfig, overrides=["algo.token_weights.nme=vppo"])


@pytest.mark.parametrize("name,kl,extra", [("delta_logp", 0.0, 1.0), ("fipo", 0.01, 0.0), ("tor", 0.01, 0.0), ("vppo", 0.01, 2.0)])
def test_tiny_run_logs_finite_token_weight_metrics(tmp_path: Path, tiny_config, name: str, kl: float, extra: float) -> None:
    # delta_logp with kl_coef 0: the reference forward runs for the weighting alone (+1);
    # vppo: the forwards with and without the images (+2)
    cfg = tiny_config(tmp_path, *ONE_ITERATION, f"algo.token_weights.name={name}", f"algo.loss.kl_coef={kl}", f"run_name={name}")
    train(cfg, progress=False)
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in rows if r["phase"] == "rl"]
    assert len(rl) == 1 and "loss" in rl[0], rl
    tw = {k: v for k, v in rl[0].items() if k.startswith("tw/")}
    assert {"tw/weight_mean", "tw/weight_max", "tw/extra_forwards"} <= set(tw), tw
    assert all(math.isfinite(v) for v in tw.values()), tw
    assert tw["tw/extra_forwards"] == extra and tw["tw/weight_mean"] > 0
    assert ("kl" in rl[0]) == (kl > 0)  # the KL term still follows kl_coef only
    if name == "vppo":
        assert 0 < tw["tw/kept_frac"] <= 1 and tw["tw/visual_dependency_mean"] >= 0
    if name == "tor":  # the focus episodes zoom (a tool call) before answering
        assert 0 < tw["tw/perception_frac"] < 1


@pytest.fixture(scope="module")
def trainer_and_batch(tmp_path_factory: pytest.TempPathFactory, tiny_config) -> Iterator[tuple[Trainer, RolloutBatch, list[Trajectory]]]:
    """A trainer on the embedded model, one collected batch (kl_coef 0: no reference) and
    the trajectories of its rows."""
    tmp = tmp_path_factory.mktemp("tw")
    cfg = tiny_config(tmp, *ONE_ITERATION, "algo.loss.kl_coef=0", "algo.token_weights.name=fipo")
    tr = Trainer(cfg, RunDir.create(tmp / "run", cfg), progress=False)
    tr.collector = RolloutCollector(cfg.env.id, num_tasks=2, group_size=2, env_kwargs=tr.env_kwargs)
    try:
        trajs, task_ids = tr.collect(0)
    finally:
        tr.collector.close()
    batch, _ = tr.score(trajs, task_ids)
    assert batch is not None and int(batch.action_mask.sum()) > 0
    rows = [t for t in trajs if t.token_ids and t.termination_reason != "env_error"]  # as score() keeps them
    assert len(rows) == batch.batch_size
    yield tr, batch, rows
    tr.run.close()


def test_tor_perception_tokens_are_those_of_tool_call_turns(trainer_and_batch) -> None:
    _, batch, trajs = trainer_and_batch
    perc = Trainer._perception_mask(batch)
    for b, traj in enumerate(trajs):
        expect = torch.zeros(batch.input_ids.shape[1], dtype=torch.bool)
        for turn in traj.turns:
            assert bool(batch.tool_turns[b, turn.index]) == bool(turn.tool_calls)
            if turn.tool_calls and turn.token_span is not None:
                expect[turn.token_span[0]: turn.token_span[1]] = True
        assert torch.equal(perc[b], expect & batch.action_mask[b])
    assert perc.any() and (batch.action_mask & ~perc).any()  # zoom replies and answers both present


def test_token_distributions_are_distributions_that_see_the_image(trainer_and_batch) -> None:
    tr, batch, _ = trainer_and_batch
    policy = tr.policy
    policy.eval()
    with_img = policy.token_distributions(batch, blank_images=False)
    without = policy.token_distributions(batch, blank_images=True)
    positions, valid = action_positions(batch.action_mask)
    assert with_img.shape == (batch.batch_size, positions.shape[1], policy.encoder.vocab_size) == without.shape
    assert not with_img.requires_grad
    for d in (with_img, without):
        torch.testing.assert_close(d.exp().sum(-1)[valid], torch.ones(int(valid.sum())))
        assert (d[~valid] == 0).all()
        assert (d[valid][:, policy.suppress_token_ids].exp() == 0).all()  # forbidden as at sampling
    # the sampled token's log-prob is the training forward's, at its packed position
    with torch.no_grad():
        lp = policy.logprobs(batch)
    sampled = batch.input_ids.gather(1, positions.clamp(max=batch.input_ids.shape[1] - 1))
    picked = with_img.gather(2, sampled.unsqueeze(-1))[..., 0]
    torch.testing.assert_close(picked[valid], lp.gather(1, positions.clamp(max=lp.shape[1] - 1))[valid], atol=1e-4, rtol=0)
    # a mean-gray image changes what the model predicts: finite KL (forbidden tokens add 0), > 0
    assert (with_img[valid].exp() - without[valid].exp()).abs().max() > 1e-4
    dep = visual_dependency(with_img, without)[valid]
    assert torch.isfinite(dep).all() and dep.max() > 1e-6
    # no sampling or dropout inside: the same call gives the same distributions
    torch.testing.assert_close(policy.token_distributions(batch, blank_images=True), without)


def _trainable(tr: Trainer) -> list[torch.nn.Parameter]:
    return [p for p in tr.policy.model.parameters() if p.requires_grad]


def test_weights_multiply_the_advantage_of_the_policy_term(trainer_and_batch, monkeypatch) -> None:
    tr, batch, _ = trainer_and_batch
    # hand-set advantages (+1 / -1 by row) so the check does not depend on sampled rewards
    sign = torch.tensor([1.0 if b % 2 == 0 else -1.0 for b in range(batch.batch_size)])[:, None]
    adv = sign * batch.action_mask.float()
    params = _trainable(tr)
    seen: list[tuple[float, float]] = []

    def record(loss: torch.Tensor) -> bool:  # loss and gradient norm, then no step
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        seen.append((float(loss.detach()), math.sqrt(sum(float((g**2).sum()) for g in grads if g is not None))))
        return False

    def constant(c: float):
        def weights(inputs, cfg):
            w = torch.full(inputs.action_mask.shape, c) * inputs.action_mask
            return w, {"weight_mean": torch.tensor(c), "extra_forwards": torch.tensor(0.0)}
        return weights

    monkeypatch.setattr(tr, "_apply", record)
    for c in (0.0, 1.0, 2.0):  # one minibatch (B <= 4), first epoch: ratio ~ 1, no clipping
        monkeypatch.setattr(loop, "compute_token_weights", constant(c))
        tr.update(batch, adv)
    (l0, g0), (l1, g1), (l2, g2) = seen
    assert l0 == 0.0 and g0 == 0.0 and g1 > 0
    assert l2 == pytest.approx(2 * l1, rel=1e-5, abs=1e-7) and g2 == pytest.approx(2 * g1, rel=1e-4)
    # a real step with zero weights leaves every parameter where it was
    monkeypatch.undo()
    monkeypatch.setattr(loop, "compute_token_weights", constant(0.0))
    before = [p.detach().clone() for p in params]
    metrics = tr.update(batch, adv)
    assert metrics["tw/weight_mean"] == 0.0 and metrics["loss"] == 0.0
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, params))
