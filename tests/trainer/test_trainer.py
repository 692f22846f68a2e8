"""The trainer end to end on tiny configs: run folder contents, parameters change,
resume after SIGKILL, bad configs, NaN guard, and a 2-process data-parallel run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

TINY = [
    "model.path=embedded:focus_warm", "sft.enabled=true", "rollout.group_size=4", "sft.demonstrations=8", "sft.steps=3", "sft.batch_size=4", "iterations=2", "rollout.tasks_per_iter=2",
    "rollout.max_new_tokens=24", "env.eval_episodes=4", "env.eval_every=1", "checkpoint_every=1",
    "sample_episodes=2", "algo.minibatch_size=4",
]


def _mmgym(*args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "mmgym.cli", *args], capture_output=True, text=True, timeout=timeout, env=e)


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next((ckpt / "model").glob("*.safetensors"))))


def test_train_smoke_writes_the_run_folder(tmp_path: Path) -> None:
    p = _mmgym("train", f"out_root={tmp_path}", "run_name=run", *TINY, "--quiet")
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "tensorboard", "checkpoints", "episodes"):
        assert (run / name).exists(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert list(run.glob("episodes/*/index.html")) and list(run.glob("episodes/*/episode_000_files/*.png"))
    phases = {json.loads(line)["phase"] for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert {"sft", "rl", "eval"} <= phases
    # the run was given no env kwargs: config.yaml records the default task it ran, spelled out
    from mmgym.trainer.config import _default_env_kwargs

    assert yaml.safe_load((run / "config.yaml").read_text())["env"]["kwargs"] == _default_env_kwargs()
    cks = sorted((run / "checkpoints").iterdir())
    assert [c.name for c in cks][-1] == "step_0000002" and len(cks) <= 3
    # parameters changed between the warm start and the end of RL
    first, last = _weights(cks[0]), _weights(cks[-1])
    assert any(not torch.equal(first[k], last[k]) for k in first)
    summary = json.loads(p.stdout[: p.stdout.rindex("}") + 1])
    assert summary["run_dir"] == str(run) and "warm_start" in summary
    # the saved checkpoint is a plain transformers folder: mmgym eval loads it
    e = _mmgym("eval", str(run), "--episodes", "2", "--env-kwargs", "max_turns=3")
    assert e.returncode == 0, e.stderr[-2000:]
    assert '"success"' in e.stdout
    e = _mmgym("eval", str(cks[-1] / "model"), "--episodes", "2", "--env", "mmgym/VQA-v0")
    assert e.returncode == 0 and '"success"' in e.stdout, e.stderr[-2000:]
    # a checkpoint inside the run (the warm start) is evaluated with the run's prompts and env
    e = _mmgym("eval", str(cks[0] / "model"), "--episodes", "2")
    assert e.returncode == 0 and '"success"' in e.stdout, e.stderr[-2000:]
    assert f"settings from the run folder {run.resolve()}" in e.stderr
    e = _mmgym("eval", str(cks[0] / "model"), "--episodes", "2", "--env", "mmgym/VQA-v0", "--no-tool-schemas")
    assert e.returncode == 0 and '"success"' in e.stdout, e.stderr[-2000:]


def test_existing_run_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("keep me")
    p = _mmgym("train", f"out_root={tmp_path}", "run_name=run", *TINY)
    assert p.returncode == 2 and "already exists" in p.stderr and "--resume" in p.stderr
    assert (tmp_path / "run" / "x").read_text() == "keep me"


@pytest.mark.parametrize("override,needle", [
    ("algo.loss.clip_hgh=0.3", "unknown config key 'algo.loss.clip_hgh'"),
    ("iterations=many", "config key 'iterations'"),
    ("algo.estimator.estimator=gae", "needs a critic"),
    ("algo.estimator.estimator=igpo", "does not compute yet"),
    ("rollout.group_size=1", "rollout.group_size >= 2"),
])
def test_bad_config_is_one_line_and_exit_2(tmp_path: Path, override: str, needle: str) -> None:
    p = _mmgym("train", f"out_root={tmp_path}", override, timeout=120)
    assert p.returncode == 2, p.stderr
    assert needle in p.stderr and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_sigkill_mid_update_then_resume(tmp_path: Path) -> None:
    args = ["train", f"out_root={tmp_path}", "run_name=run", *TINY, "iterations=6", "env.eval_every=0", "--quiet"]
    e = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "mmgym.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=e)
    run = tmp_path / "run"
    deadline = time.time() + 400
    while time.time() < deadline:  # wait until RL checkpoints exist, then kill mid-iteration
        cks = [c for c in (run / "checkpoints").glob("step_*")] if (run / "checkpoints").exists() else []
        if any(c.name >= "step_0000002" for c in cks):
            break
        if proc.poll() is not None:
            pytest.fail(f"training ended early: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = sorted(c.name for c in (run / "checkpoints").glob("step_*"))
    assert before, "no checkpoint before the kill"
    for ck in (run / "checkpoints").glob("step_*"):  # every complete checkpoint loads
        json.loads((ck / "state.json").read_text())
        _weights(ck)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip().endswith("}")]
    last_before = max(r["step"] for r in rows if r["phase"] == "rl")
    p = _mmgym("train", "--resume", str(run), "--quiet")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rl_steps = [r["step"] for r in rows if r["phase"] == "rl"]
    assert max(rl_steps) == 6 and min(s for s in rl_steps if s > int(before[-1][5:])) == int(before[-1][5:]) + 1
    assert last_before <= 6
    state = json.loads(sorted((run / "checkpoints").glob("step_*"))[-1].joinpath("state.json").read_text())
    assert state["iteration"] == 6 and state["phase"] == "done"
    assert not list((run / "checkpoints").glob(".tmp_*"))


def test_two_process_gloo_run_keeps_ranks_identical(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533", "-m", "mmgym.cli",
           "train", f"out_root={tmp_path}", "run_name=ddp", *TINY, "env.eval_every=0", "--quiet"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    sync = [r for r in rows if r["phase"] == "dist"]
    assert sync and sync[-1]["world_size"] == 2.0 and sync[-1]["ranks_in_sync"] == 1.0
    assert max(r["step"] for r in rows if r["phase"] == "rl") == 2


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path: Path) -> None:
    from mmgym.core import load_config
    from mmgym.trainer import TrainConfig, TrainingDiverged
    from mmgym.trainer.loop import Trainer
    from mmgym.trainer.run_dir import RunDir

    cfg = load_config(TrainConfig, overrides=[*TINY, f"out_root={tmp_path}"])
    run = RunDir.create(tmp_path / "nan", cfg)
    tr = Trainer(cfg, run, progress=False)
    tr.checkpoint(0)
    before = {k: v.clone() for k, v in tr.policy.model.state_dict().items()}
    good = sum(p.sum() for p in tr.policy.model.parameters() if p.requires_grad) * 0.0
    assert tr._apply(torch.tensor(float("nan"))) is False
    assert tr._apply(good) is True and tr.state.bad_updates == 0  # a good update resets the count
    assert tr._apply(torch.tensor(float("inf"))) is False
    assert tr._apply(torch.tensor(float("nan"))) is False
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        tr._apply(torch.tensor(float("nan")))
    assert tr.state.skipped_updates == 4
    events = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines() if '"event"' in x]
    assert len(events) == 4
    assert RunDir(run.path).latest_checkpoint().name == "step_0000000"
    after = tr.policy.model.state_dict()
    assert all(torch.allclose(before[k], after[k]) for k in before)  # zero-gradient step, no NaN written


def test_rundir_enclosing_finds_the_run_of_a_checkpoint_and_nothing_else(tmp_path: Path) -> None:
    from mmgym.trainer.run_dir import RunDir

    model = tmp_path / "run" / "checkpoints" / "step_0000003" / "model"
    model.mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("seed: 0\n")
    run = (tmp_path / "run").resolve()
    for p in (tmp_path / "run", model, model.parent):
        assert RunDir.enclosing(p).path == run
    (tmp_path / "run" / "notes").mkdir()
    assert RunDir.enclosing(tmp_path / "run" / "notes") is None  # inside the run, but not a checkpoint
    assert RunDir.enclosing(tmp_path) is None


def test_checkpoint_rotation_keeps_the_latest_and_the_pinned_warm_start(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from mmgym.trainer.run_dir import RunDir

    def save(folder: Path, **_: object) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "weights.bin").write_bytes(b"w")

    policy = SimpleNamespace(model=SimpleNamespace(save_pretrained=save), processor=SimpleNamespace(save_pretrained=save))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    run = RunDir(tmp_path / "run")
    for step in (0, 10, 20, 30, 40):
        run.save_checkpoint(step, policy=policy, optimizer=opt, state={"iteration": step}, keep=2, pinned=(0,))
    assert [p.name for p in run.checkpoints()] == ["step_0000000", "step_0000030", "step_0000040"]
    for step in (50, 60):
        run.save_checkpoint(step, policy=policy, optimizer=opt, state={"iteration": step}, keep=2)
    assert [p.name for p in run.checkpoints()] == ["step_0000050", "step_0000060"]  # unpinned: rotated out
    with pytest.raises(ValueError, match="keep must be >= 1"):
        run.save_checkpoint(70, policy=policy, optimizer=opt, state={}, keep=0)
    assert [p.name for p in run.checkpoints()] == ["step_0000050", "step_0000060"]  # refused before writing


def test_an_interrupted_warm_start_resumes_from_its_sft_checkpoint(tmp_path: Path) -> None:
    from mmgym.core import load_config
    from mmgym.trainer import TrainConfig
    from mmgym.trainer.loop import Trainer
    from mmgym.trainer.run_dir import RunDir

    cfg = load_config(TrainConfig, overrides=[*TINY, f"out_root={tmp_path}", "sft.steps=5", "sft.checkpoint_every=2", "iterations=0",
                                              "env.eval_episodes=2"])
    run = RunDir.create(tmp_path / "sft", cfg)
    tr = Trainer(cfg, run, progress=False)
    calls = {"n": 0}
    apply = tr._apply

    def dies_at_the_fourth_update(loss: torch.Tensor) -> bool:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed")
        return apply(loss)

    tr._apply = dies_at_the_fourth_update  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    assert [p.name for p in run.checkpoints()] == ["sft_0000002"]  # step 3 finished, but only every 2nd is saved
    saved = _weights(run.ckpt_root / "sft_0000002")
    resumed = Trainer(cfg, RunDir(run.path), progress=False)
    assert resumed.state.phase == "sft" and resumed.state.sft_step == 2
    assert all(torch.equal(saved[k], v) for k, v in resumed.policy.model.state_dict().items() if k in saved)
    assert resumed.optimizer.state_dict()["state"], "the SFT optimizer's moments come back"
    resumed.fit()
    rows = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows if r["phase"] == "sft") == 4  # the last SFT step (0-based) ran after the resume
    assert [p.name for p in RunDir(run.path).checkpoints()] == ["step_0000000"]  # SFT checkpoints superseded


def test_pushblock_warm_start_adds_the_action_tokens_once_and_resumes_with_them(tmp_path: Path) -> None:
    from mmgym.core import load_config
    from mmgym.trainer import TrainConfig
    from mmgym.trainer.loop import Trainer
    from mmgym.trainer.run_dir import RunDir

    cfg = load_config(TrainConfig, overrides=[
        *TINY, f"out_root={tmp_path}", "model.path=embedded:base", "env.id=mmgym/PushBlock-v0", "env.kwargs={max_steps: 48}",
        "rollout.tool_schemas=false", "rollout.max_new_tokens=80", "iterations=1", "env.eval_episodes=2", "sample_episodes=0",
        "threads=1"])
    run = RunDir.create(tmp_path / "pb", cfg)
    tr = Trainer(cfg, run, progress=False)
    assert tr.policy.added_tokens == 256
    tr.fit()
    ck = RunDir(run.path).latest_checkpoint()
    assert ck is not None
    resumed = Trainer(cfg, RunDir(run.path), progress=False)
    assert resumed.policy.added_tokens == 0  # the checkpoint's tokenizer holds them
    assert len(resumed.policy.tokenizer("<act_7><act_255>", add_special_tokens=False)["input_ids"]) == 2
    emb = [v for k, v in _weights(ck).items() if k.endswith("embed_tokens.weight")]
    assert emb and emb[0].shape[0] == resumed.policy.model.get_input_embeddings().weight.shape[0] >= 1716 + 256
    rows = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert any(r["phase"] == "rl" for r in rows)
    e = _mmgym("eval", str(run.path), "--episodes", "2")
    assert e.returncode == 0 and '"success"' in e.stdout, e.stderr[-2000:]
    # the embedded model's own folder evaluated on PushBlock gets the tokens too (fresh rows)
    e = _mmgym("eval", "embedded:base", "--episodes", "1", "--env", "mmgym/PushBlock-v0", "--env-kwargs", "max_steps=16",
               "--max-new-tokens", "80")
    assert e.returncode == 0 and '"success"' in e.stdout, e.stderr[-2000:]
