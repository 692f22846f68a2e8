"""The learner under DeepSpeed ZeRO (``learner.strategy=deepspeed``): config checks, the
error without the extra, a 2-process gloo run whose ranks end identical, and a resume
from sharded optimizer state that steps exactly as the uninterrupted run."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmgym.core import ConfigError, load_config, to_dict
from mmgym.trainer import TrainConfig

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="needs the deepspeed extra: pip install 'mmgym[deepspeed]'")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(*args: str, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(_free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))


def _config_file(cfg: TrainConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next(folder.glob("*.safetensors"))))


@pytest.mark.parametrize("override,needle", [
    ("learner.strategy=fsdp", "config key 'learner.strategy'"),
    ("learner.zero_stage=3", "learner.zero_stage=3 partitions the weights"),
    ("learner.zero_stage=0", "learner.zero_stage must be 1 or 2, got 0"),
    ("learner.zero_stage=two", "config key 'learner.zero_stage'"),
])
def test_bad_learner_config_is_a_one_line_error(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, overrides=[override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_default_learner_is_ddp() -> None:
    cfg = load_config(TrainConfig, overrides=["learner.strategy=deepspeed"])
    assert TrainConfig().learner.strategy == "ddp" and cfg.learner.zero_stage == 2


def test_missing_deepspeed_names_the_extra_before_loading_a_model(tmp_path: Path, tiny_config: Callable[..., TrainConfig],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from mmgym.trainer import loop
    from mmgym.trainer.run_dir import RunDir

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    monkeypatch.setattr(loop, "build_policy", lambda *a, **k: pytest.fail("loaded a model first"))
    cfg = tiny_config(tmp_path, "learner.strategy=deepspeed")
    with pytest.raises(ImportError, match=r"pip install 'mmgym\[deepspeed\]'"):
        loop.Trainer(cfg, RunDir.create(tmp_path / "run", cfg), progress=False)


def test_mmgym_imports_without_deepspeed() -> None:
    code = ("import sys; sys.modules['deepspeed'] = None\n"
            "import mmgym, mmgym.cli, mmgym.trainer, mmgym.trainer.deepspeed_learner\n"
            "from mmgym.trainer import TrainConfig; TrainConfig()")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-2000:]


@needs_deepspeed
@pytest.mark.slow
def test_two_process_zero2_run_keeps_ranks_identical(tmp_path: Path, tiny_config: Callable[..., TrainConfig]) -> None:
    from mmgym.trainer.common import model_dir

    cfg = tiny_config(tmp_path, "iterations=2", "checkpoint_every=1", "run_name=ds", "learner.strategy=deepspeed", "learner.zero_stage=2")
    p = _torchrun("-m", "mmgym.cli", "train", str(_config_file(cfg, tmp_path / "ds.yaml")), "--quiet")
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "ds"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    sync = [r for r in rows if r["phase"] == "dist"]
    assert sync and sync[-1]["world_size"] == 2.0 and sync[-1]["ranks_in_sync"] == 1.0
    assert max(r["step"] for r in rows if r["phase"] == "rl") == 2
    last = run / "checkpoints" / "step_0000002"
    assert sorted(f.name for f in (last / "zero").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    assert torch.load(last / "optim.pt", weights_only=False)["optimizer"]["deepspeed"]["world_size"] == 2
    assert not list((run / "checkpoints").glob(".tmp_*"))
    start, end = _weights(model_dir("embedded:focus_warm")), _weights(last / "model")
    assert start.keys() == end.keys() and any(not torch.equal(start[k], end[k]) for k in start)
    from transformers import AutoModelForImageTextToText  # the model folder is plain transformers

    assert AutoModelForImageTextToText.from_pretrained(last / "model").num_parameters() > 0
    # the shards fit 2 ranks only: a 1-process resume is refused with the fix, in one line
    r = subprocess.run([sys.executable, "-m", "mmgym.cli", "train", "--resume", str(run), "--quiet"], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2 and "torchrun --nproc-per-node 2" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


# Each rank: two ZeRO steps on a rank-dependent loss (so the reduction matters), a sharded
# checkpoint, a second Trainer resumed from it, then one more identical step on both.
_RESUME_SCRIPT = """
import json, sys
from pathlib import Path
import torch
from mmgym.core import load_config
from mmgym.trainer import TrainConfig, distributed as dist_utils
from mmgym.trainer.loop import Trainer
from mmgym.trainer.run_dir import RunDir

dist_utils.init_from_env()
rank = dist_utils.rank_and_world()[0]
cfg = load_config(TrainConfig, sys.argv[1])
out = Path(cfg.out_root)
run = RunDir.create(out / "run", cfg) if rank == 0 else RunDir(out / "run")
dist_utils.barrier()

def step(tr):
    tr._set_lr(1e-3)
    assert tr._apply(sum(((p - 0.01 * (rank + 1)) ** 2).mean() for p in tr.policy.parameters()))

a = Trainer(cfg, run, progress=False)
start = {k: v.clone() for k, v in a.policy.model.state_dict().items()}
step(a); step(a)
a.checkpoint(1)
b = Trainer(cfg, RunDir(run.path), progress=False)
resumed = b.policy.model.state_dict()
loaded = all(torch.equal(v, resumed[k]) for k, v in a.policy.model.state_dict().items())
step(a); step(b)
sa, sb = a.policy.model.state_dict(), b.policy.model.state_dict()
(out / f"rank_{rank}.json").write_text(json.dumps({"rank": rank, "loaded": loaded, "same_next_step": all(torch.equal(sa[k], sb[k]) for k in sa),
                  "changed": any(not torch.equal(start[k], sa[k]) for k in sa),
                  "lr": b.learner.base_optimizer.param_groups[0]["lr"], "in_sync": dist_utils.params_in_sync(b.policy.model)}))
dist_utils.shutdown()
"""


@needs_deepspeed
@pytest.mark.slow
def test_two_process_resume_from_shards_steps_like_the_uninterrupted_run(tmp_path: Path, tiny_config: Callable[..., TrainConfig]) -> None:
    script = tmp_path / "resume.py"
    script.write_text(_RESUME_SCRIPT)
    cfg = tiny_config(tmp_path, "learner.strategy=deepspeed")
    p = _torchrun(str(script), str(_config_file(cfg, tmp_path / "cfg.yaml")))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1)]
    for r in rows:
        assert r == dict(r, loaded=True, same_next_step=True, changed=True, lr=1e-3, in_sync=True)
