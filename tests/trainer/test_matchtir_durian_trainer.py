"""MatchTIR and Durian in the trainer: the ``algo.matchtir`` / ``algo.durian`` sections,
ChainOfFocus's gold tool calls (the oracle's zooms) recorded on every trajectory at
reset, the per-episode estimator inputs worked by hand, and tiny in-process runs."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import mmgym  # noqa: F401  (registers env ids)
from mmgym.agents import RolloutCollector, RolloutSettings, ScriptedPolicy
from mmgym.agents.episodes import run_episode
from mmgym.agents.scripted import OracleAgent
from mmgym.algos import (
    DurianEstimatorConfig,
    MatchTIRConfig,
    MatchTIREstimatorConfig,
    combine_difficulty,
    visual_entropy,
)
from mmgym.core import ConfigError, ToolCall, Trajectory, Turn, load_config
from mmgym.envs.focus import ChainOfFocusEnv
from mmgym.trainer import TrainConfig
from mmgym.trainer.config import DurianSection
from mmgym.trainer.estimator_inputs import durian_difficulty, gold_calls, matchtir_inputs, mean_token_logprob
from mmgym.trainer.loop import Trainer
from mmgym.trainer.run_dir import RunDir

ENV = "mmgym/ChainOfFocus-v0"
MATCHTIR_KEYS = {"matchtir/skipped", "matchtir/turn_reward_mean"}
DURIAN_KEYS = {"durian/bins", "durian/difficulty_std", "durian/no_image"}


def _zoom(region: int) -> ToolCall:
    return ToolCall("zoom", {"region": region})


def _traj(group: int, calls: list[list[ToolCall]], gold: list[list[ToolCall]] | None) -> Trajectory:
    """A hand-made episode: turn k makes ``calls[k]`` (2 generated tokens per turn), then an
    answer turn; ``gold`` goes to ``info["gold_tool_calls"]`` as the rollout records it."""
    t = Trajectory(task_id="hand", group=group)
    for k, cs in enumerate([*calls, []]):
        t.turns.append(Turn(index=k, observation="", tool_calls=tuple(cs), token_span=(3 * k + 1, 3 * k + 3)))
        t.token_ids += [5, 6, 7]
        t.action_mask += [0, 1, 1]
        t.logprobs += [0.0, -0.5, -0.25]
    t.turns[-1].reward = 1.0
    if gold is not None:
        t.info["gold_tool_calls"] = [[c.to_json() for c in turn] for turn in gold]
    return t


def _fit(cfg: TrainConfig, name: str) -> tuple[Trainer, list[dict]]:
    tr = Trainer(cfg, RunDir.create(Path(cfg.out_root) / name, cfg), progress=False)
    tr.fit()
    tr.run.close()
    rows = [json.loads(x) for x in (Path(cfg.out_root) / name / "metrics.jsonl").read_text().splitlines()]
    return tr, [r for r in rows if r["phase"] == "rl"]


@pytest.fixture(scope="module")
def matchtir_run(tmp_path_factory: pytest.TempPathFactory, tiny_config) -> Iterator[tuple[Trainer, list[dict]]]:
    """Two iterations of ``matchtir`` on the tiny config (2 tasks x 2 episodes)."""
    cfg = tiny_config(tmp_path_factory.mktemp("matchtir"), "iterations=2", "algo.estimator.estimator=matchtir")
    yield _fit(cfg, "matchtir")


# --------------------------------------------------------------------------- config


def test_config_accepts_both_estimators_and_builds_their_configs() -> None:
    cfg = load_config(TrainConfig, overrides=["algo.estimator.estimator=matchtir", "algo.matchtir.assignment=soft",
                                              "algo.matchtir.turn_weight=0.25"])
    est = cfg.algo.estimator_config
    assert isinstance(est, MatchTIREstimatorConfig) and est.matchtir is cfg.algo.matchtir
    assert (est.matchtir.assignment, est.matchtir.turn_weight, est.matchtir.gamma) == ("soft", 0.25, 0.9)
    cfg = load_config(TrainConfig, overrides=["algo.estimator.estimator=durian_grpo", "algo.durian.num_bins=2",
                                              "algo.durian.edges=[-1.0, 1.0]", "algo.durian.confidence_weight=0.5"])
    est = cfg.algo.estimator_config
    assert isinstance(est, DurianEstimatorConfig) and est.durian is cfg.algo.durian
    assert (est.durian.num_bins, est.durian.edges, est.durian.confidence_weight) == (2, (-1.0, 1.0), 0.5)
    other = load_config(TrainConfig, overrides=["algo.estimator.estimator=grpo"]).algo
    assert other.estimator_config is other.estimator


@pytest.mark.parametrize("estimator,override,needle", [
    ("matchtir", "algo.matchtir.gamma=1.5", "config section 'algo.matchtir': MatchTIRConfig.gamma must lie in [0, 1]"),
    ("matchtir", "algo.matchtir.assignment=greedy", "'algo.matchtir.assignment': 'greedy' is not one of 'hard', 'soft'"),
    ("matchtir", "algo.matchtir.sinkhorn_reg=0", "sinkhorn_reg must be > 0"),
    ("matchtir", "algo.matchtir.traj_weight=-1", "weights must be >= 0"),
    ("matchtir", "algo.matchtir.gama=0.5", "unknown config key 'algo.matchtir.gama'"),
    ("matchtir", "rollout.group_size=1", "rollout.group_size >= 2"),
    ("durian_grpo", "algo.durian.num_bins=0", "config section 'algo.durian': DurianConfig.num_bins must be >= 1"),
    ("durian_grpo", "algo.durian.binning=kmeans", "'algo.durian.binning': 'kmeans' is not one of 'quantile', 'uniform'"),
    ("durian_grpo", "algo.durian.edges=[1.0, 0.0]", "edges must be strictly increasing"),
    ("durian_grpo", "algo.durian.visual_weight=-1", "algo.durian.visual_weight and confidence_weight must be >= 0"),
    ("durian_grpo", "algo.durian.visual_weight=0", "both 0"),
    ("durian_grpo", "rollout.group_size=1", "rollout.group_size >= 2"),
])
def test_config_rejects_bad_values(estimator: str, override: str, needle: str) -> None:
    extra = ["algo.durian.confidence_weight=0"] if override == "algo.durian.visual_weight=0" else []
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, overrides=[f"algo.estimator.estimator={estimator}", *extra, override])
    assert needle in str(err.value)


def test_igpo_is_still_rejected() -> None:
    with pytest.raises(ConfigError, match="does not compute yet"):
        load_config(TrainConfig, overrides=["algo.estimator.estimator=igpo"])


# --------------------------------------------------------------------------- gold calls


@pytest.mark.parametrize("zoom", ["region", "bbox"])
def test_focus_reset_gives_the_oracles_zooms_as_gold_calls(zoom: str) -> None:
    env = gym.make(ENV, zoom=zoom, question_types=("relative",), max_turns=4)
    _, info = env.reset(seed=5)
    base = env.unwrapped
    gold = info["gold_tool_calls"]
    assert len(gold) == 2 and all(len(turn) == 1 for turn in gold)  # one turn per target
    key = "region" if zoom == "region" else "bbox"
    assert [t[0] for t in gold] == [{"name": "zoom", "arguments": {key: base.oracle_region(k) if key == "region" else base.oracle_box(k)}}
                                    for k in range(2)]
    first = base.parser.parse(base.oracle_action()).tool_calls
    assert [c.to_json() for c in first] == gold[0]  # the oracle's first reply is the gold's first turn
    json.dumps(gold)  # plain JSON data
    # run_episode records them too, and the oracle's episode makes exactly those calls
    traj = run_episode(gym.make(ENV, zoom=zoom, question_types=("relative",), max_turns=4), OracleAgent(), seed=5)
    assert traj.info["gold_tool_calls"] == gold and traj.success
    made = [[c.to_json() for c in turn.tool_calls] for turn in traj.turns if turn.tool_calls]
    assert made == gold[: len(made)] and made  # (a zoom may reveal both targets: then one turn fewer)
    # one turn must be left for the answer: max_turns=2 keeps the first target's zoom only
    _, info = gym.make(ENV, zoom=zoom, question_types=("relative",), max_turns=2).reset(seed=5)
    assert info["gold_tool_calls"] == gold[:1]


def test_envs_without_gold_calls_give_none() -> None:
    assert "gold_tool_calls" not in gym.make("mmgym/VQA-v0").reset(seed=0)[1]  # the base hook's default
    env = ChainOfFocusEnv(zoom="region", canvas=(256, 320))
    env.reset(seed=0)
    env.task.boxes = ()
    assert env.gold_tool_calls() is None


def test_rollouts_record_gold_calls_and_the_oracle_matches_them() -> None:
    settings = RolloutSettings(keep_images=False, visual_entropy=True)
    col = RolloutCollector(ENV, num_tasks=2, group_size=2, settings=settings, env_kwargs={"zoom": "region", "canvas": (256, 320)})
    try:
        trajs = col.collect(ScriptedPolicy.from_agent(OracleAgent()), seeds=[3, 11])
    finally:
        col.close()
    for t in trajs:
        env = gym.make(ENV, zoom="region", canvas=(256, 320))
        obs, info = env.reset(seed=t.info["seed"])
        assert t.info["gold_tool_calls"] == info["gold_tool_calls"]
        assert t.info["visual_entropy"] == pytest.approx(visual_entropy(obs["images"][0]))  # though no image is kept
        assert all(turn.images == () for turn in t.turns)
    K = max(t.num_turns for t in trajs)
    out, _ = matchtir_inputs(trajs, K, MatchTIRConfig())
    # the oracle zooms exactly as the gold says (reward 1 per zoom turn), then answers (no call: 0)
    zooms = [[float(k < t.num_turns - 1) for k in range(K)] for t in trajs]
    assert torch.equal(out["matchtir_turn_rewards"], torch.tensor(zooms))
    assert bool(out["has_gold"].all()) and {t.num_turns for t in trajs} == {2, 3}  # an attribute and a relative task


def test_process_pool_carries_the_gold_calls() -> None:
    kw = {"zoom": "region", "canvas": (256, 320)}
    policy = ScriptedPolicy(lambda conv: "<answer>A</answer>")
    got = {}
    for backend in ("local", "process"):
        col = RolloutCollector(ENV, num_tasks=1, group_size=2, env_kwargs=kw, backend=backend,
                               pool_kwargs={"num_workers": 1, "step_timeout_s": 30} if backend == "process" else None)
        try:
            got[backend] = [t.info.get("gold_tool_calls") for t in col.collect(policy, seeds=[7])]
        finally:
            col.close()
    assert got["process"] == got["local"] and got["local"][0]


# --------------------------------------------------------------------------- estimator inputs by hand


def test_matchtir_inputs_worked_by_hand() -> None:
    gold = [[_zoom(7)]]
    trajs = [
        _traj(0, [[_zoom(7)]], gold),  # exact: (1 + 1 + 1) / (2 + 1) = 1
        _traj(0, [[_zoom(5)]], gold),  # name + key IoU, wrong value: (1 + 1 + 0) / 3
        _traj(0, [[ToolCall("crop", {"region": 7})]], gold),  # another tool: 0
        _traj(0, [[_zoom(7)]], None),  # no gold: skipped, counted
        _traj(0, [[_zoom(7)]], [[]]),  # an empty gold list is no gold either
    ]
    out, metrics = matchtir_inputs(trajs, 3, MatchTIRConfig())
    expected = torch.tensor([[1.0, 0.0, 0.0], [2 / 3, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0] * 3, [0.0] * 3])
    assert torch.allclose(out["matchtir_turn_rewards"], expected)
    assert out["has_gold"].tolist() == [True, True, True, False, False]
    assert metrics["matchtir/skipped"] == 2.0
    # mean over the 2 real turns of each of the 3 episodes with gold
    assert metrics["matchtir/turn_reward_mean"] == pytest.approx((1 + 2 / 3) / 6)


def test_malformed_gold_calls_are_no_gold() -> None:
    t = _traj(0, [[_zoom(7)]], None)
    for bad in ([{"name": "zoom"}], "zoom", [[{"arguments": {}}]], [[1]]):
        t.info["gold_tool_calls"] = bad
        assert gold_calls(t) is None
    t.info["gold_tool_calls"] = [[{"name": "zoom", "arguments": {"region": 1}}], [{"name": "zoom", "arguments": {"region": 2}}]]
    assert [c["arguments"]["region"] for c in gold_calls(t)] == [1, 2]


def test_durian_difficulty_by_hand() -> None:
    logp = torch.tensor([[0.0, -1.0, -3.0], [0.0, -0.5, float("nan")], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[False, True, True], [False, True, True], [False, False, False]])
    conf = mean_token_logprob(logp, mask)
    assert conf.tolist() == [-2.0, -0.5, 0.0]  # NaN (a token vLLM gave no log-prob) left out; no token: 0
    visual = torch.tensor([1.0, 3.0, math.nan])  # the third episode had no image: it takes the mean, 2
    d, m = durian_difficulty(visual, conf, torch.tensor([0, 0, 1]), DurianSection(num_bins=2))
    assert torch.allclose(d, combine_difficulty(torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64), conf.double()))
    assert m["durian/no_image"] == 1.0 and m["durian/bins"] == 2.0 and m["durian/difficulty_std"] > 0


# --------------------------------------------------------------------------- runs


def test_matchtir_run_logs_its_metrics(matchtir_run) -> None:
    _, rl = matchtir_run
    assert len(rl) == 2
    for row in rl:
        assert MATCHTIR_KEYS <= set(row) and "loss" in row, row
        assert row["matchtir/skipped"] == 0.0  # every ChainOfFocus task has gold calls
        assert 0.0 <= row["matchtir/turn_reward_mean"] <= 1.0


def test_the_trainer_passes_the_hand_worked_turn_rewards(matchtir_run, monkeypatch: pytest.MonkeyPatch) -> None:
    tr, _ = matchtir_run
    seen: list[dict] = []
    orig = Trainer.estimate

    def spy(self, batch, *, extra=None):
        seen.append(extra)
        return orig(self, batch, extra=extra)

    monkeypatch.setattr(Trainer, "estimate", spy)
    monkeypatch.setattr(Trainer, "update", lambda self, batch, adv: {"adv": adv})
    gold = [[_zoom(7)]]
    trajs = [_traj(0, [[_zoom(7)]], gold), _traj(0, [[_zoom(5)]], gold)]
    batch, metrics = tr.score(trajs, [0])
    assert batch is not None and metrics["matchtir/skipped"] == 0.0
    out = tr.learn(batch)
    (extra,) = seen
    assert torch.allclose(extra["matchtir_turn_rewards"], torch.tensor([[1.0, 0.0], [2 / 3, 0.0]]))
    assert extra["has_gold"].tolist() == [True, True]
    # equal outcomes: A_traj = 0, so the exact zoom's tokens get the larger (turn-level) advantage
    adv = out["adv"]
    assert float(adv[0, 1]) > 0 > float(adv[1, 1])


def test_episodes_without_gold_are_skipped_and_counted(matchtir_run, monkeypatch: pytest.MonkeyPatch) -> None:
    tr, _ = matchtir_run
    monkeypatch.setattr(ChainOfFocusEnv, "gold_tool_calls", lambda self: None)
    c = tr.cfg
    tr.collector = RolloutCollector(c.env.id, num_tasks=c.rollout.tasks_per_iter, group_size=c.rollout.group_size,
                                    env_kwargs=tr.env_kwargs)
    try:
        metrics = tr.iteration(tr.state.iteration)
    finally:
        tr.collector.close()
    assert metrics["matchtir/skipped"] == 4.0 and metrics["matchtir/turn_reward_mean"] == 0.0
    assert "loss" in metrics and math.isfinite(metrics["loss"])


def test_durian_run_logs_its_metrics(tmp_path: Path, tiny_config) -> None:
    cfg = tiny_config(tmp_path, "iterations=1", "algo.estimator.estimator=durian_grpo", "algo.durian.num_bins=2")
    tr, rl = _fit(cfg, "durian")
    (row,) = rl
    assert DURIAN_KEYS <= set(row) and "loss" in row, row
    assert 1.0 <= row["durian/bins"] <= 2.0 and row["durian/no_image"] == 0.0
    assert np.isfinite(row["durian/difficulty_std"])
