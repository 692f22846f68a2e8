"""The run folder: resolved config, metrics, TensorBoard events, curves, checkpoints.

Checkpoints are written atomically: everything goes into a temporary directory whose
files are fsynced, then one ``os.replace`` renames it to ``checkpoints/step_XXXXXXX`` (RL
iteration X; ``step_0000000`` is where RL starts) or ``checkpoints/sft_XXXXXXX`` (SFT step X
of a warm start in progress); a directory under that name is therefore always complete.
Names sort in training order (every ``sft_`` before every ``step_``). The last K are kept.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mmgym.core import to_dict

CHECKPOINT_KINDS = ("sft_", "step_")  # name prefixes, in training order

__all__ = ["RunDir", "RunDirError", "atomic_write_bytes"]

log = logging.getLogger(__name__)


class RunDirError(RuntimeError):
    """The run folder cannot be used as asked (exists without --resume, nothing to resume, ...)."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder, fsync, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunDir:
    """One training run's folder. Use ``RunDir.create`` or ``RunDir.open_for_resume``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.ckpt_root = self.path / "checkpoints"
        self.episodes = self.path / "episodes"
        self._tb: Any = None

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, path: Path, config: Any) -> RunDir:
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise RunDirError(f"run folder {str(path)!r} already exists; pass --resume {path} to continue it, or pick another run_name")
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        atomic_write_bytes(path / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False).encode())
        return run

    @classmethod
    def open_for_resume(cls, path: Path) -> RunDir:
        path = Path(path)
        if not (path / "config.yaml").is_file():
            raise RunDirError(f"{str(path)!r} is not a run folder (no config.yaml)")
        return cls(path)

    @classmethod
    def enclosing(cls, path: Path) -> RunDir | None:
        """The run folder ``path`` is, or whose ``checkpoints/`` holds it (a checkpoint or its
        ``model`` folder); None for a folder outside any run."""
        path = Path(path).resolve()
        for p in (path, *path.parents):
            run = cls(p)
            if (p / "config.yaml").is_file() and (p == path or run.ckpt_root in path.parents):
                return run
        return None

    def config_tree(self) -> dict[str, Any]:
        return yaml.safe_load((self.path / "config.yaml").read_text(encoding="utf-8")) or {}

    def train_config(self) -> Any:
        """The run's resolved ``TrainConfig`` (what ``--resume`` and ``mmgym eval`` reuse)."""
        from mmgym.core import from_dict
        from mmgym.trainer.config import TrainConfig

        return from_dict(TrainConfig, self.config_tree())

    # ------------------------------------------------------------------ metrics
    def log_metrics(self, step: int, metrics: dict[str, float], *, phase: str) -> None:
        """Append one JSON line (fsynced) and write TensorBoard scalars."""
        row = {"step": int(step), "phase": phase, "time": round(time.time(), 3)}
        row.update({k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v) for k, v in metrics.items()})
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tb = self._writer()
        if tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float, np.floating, np.integer)) and np.isfinite(v):
                    tb.add_scalar(f"{phase}/{k}", float(v), int(step))
            tb.flush()

    def _writer(self) -> Any:
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a core dependency, but never fail a run over it
                self._tb = False
                return None
            self._tb = SummaryWriter(str(self.path / "tensorboard"))
        return self._tb or None

    def read_metrics(self) -> list[dict[str, Any]]:
        p = self.path / "metrics.jsonl"
        if not p.exists():
            return []
        rows = []
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut by a kill mid-write: skip it
                continue
        return rows

    def plot(self) -> Path | None:
        """Refresh ``curves.png``: training reward/success per iteration and held-out success."""
        rows = self.read_metrics()
        train = [r for r in rows if r.get("phase") == "rl"]
        evals = [r for r in rows if r.get("phase") == "eval"]
        if not train and not evals:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        if train:
            x = [r["step"] for r in train]
            axes[0].plot(x, [r.get("reward_mean", np.nan) for r in train], label="reward")
            axes[0].plot(x, [r.get("success", np.nan) for r in train], label="success")
            axes[0].set_xlabel("RL iteration")
            axes[0].set_title("training rollouts")
            axes[0].legend()
        if evals:
            axes[1].plot([r["step"] for r in evals], [r.get("success", np.nan) for r in evals], marker="o", label="held-out success")
            axes[1].set_xlabel("RL iteration (0 = after warm start)")
            axes[1].set_ylim(0, 1)
            axes[1].set_title("held-out evaluation")
            axes[1].legend()
        fig.tight_layout()
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        atomic_write_bytes(self.path / "curves.png", buf.getvalue())
        return self.path / "curves.png"

    # ------------------------------------------------------------------ checkpoints
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (``sft_*`` before ``step_*``)."""
        if not self.ckpt_root.is_dir():
            return []
        return sorted(p for p in self.ckpt_root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_KINDS) and (p / "state.json").is_file())

    def drop_checkpoints(self, kind: str) -> None:
        """Delete every checkpoint of ``kind`` (``"sft"``: once RL has started they are superseded)."""
        for p in self.checkpoints():
            if p.name.startswith(kind + "_"):
                shutil.rmtree(p, ignore_errors=True)

    def latest_checkpoint(self) -> Path | None:
        cks = self.checkpoints()
        return cks[-1] if cks else None

    def save_checkpoint(self, step: int, *, policy: Any, optimizer: Any, state: dict[str, Any], keep: int,
                        write_extra: Callable[[Path], None] | None = None, pinned: Collection[int] = (), kind: str = "step") -> Path:
        """Write model (transformers format), optimizer and trainer state atomically.
        ``write_extra(folder)`` writes more into the checkpoint folder before it is fsynced
        and renamed (e.g. PRIME's PRM under ``prm/``), so it is as atomic as the rest.
        ``kind``: ``"step"`` (RL iteration ``step``) or ``"sft"`` (SFT step ``step``). Then only
        the ``keep`` latest checkpoints stay, plus the ``step`` checkpoints of ``pinned``."""
        import torch

        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if kind + "_" not in CHECKPOINT_KINDS:
            raise ValueError(f"kind must be 'step' or 'sft', got {kind!r}")
        self.ckpt_root.mkdir(parents=True, exist_ok=True)
        final = self.ckpt_root / f"{kind}_{step:07d}"
        tmp = Path(tempfile.mkdtemp(dir=self.ckpt_root, prefix=f".tmp_{kind}_{step:07d}_"))
        try:
            policy.model.save_pretrained(tmp / "model", safe_serialization=True)
            policy.processor.save_pretrained(tmp / "model")
            torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, tmp / "optim.pt")
            state = dict(state, numpy_rng=_np_state(), python_rng=_py_state())
            (tmp / "state.json").write_text(json.dumps(state), encoding="utf-8")
            if write_extra is not None:
                write_extra(tmp)
            for p in tmp.rglob("*"):
                if p.is_file():
                    with open(p, "rb") as f:
                        os.fsync(f.fileno())
            if final.exists():  # a re-save of the same step (resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.ckpt_root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        pinned_names = {f"step_{s:07d}" for s in pinned}
        rotating = [p for p in self.checkpoints() if p.name not in pinned_names]
        for old in rotating[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.ckpt_root.glob(".tmp_*"):  # left by a run killed mid-save (any kind, DeepSpeed staging too)
            shutil.rmtree(stale, ignore_errors=True)
        return final

    @staticmethod
    def load_state(ckpt: Path) -> dict[str, Any]:
        state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
        _set_np_state(state.pop("numpy_rng", None))
        _set_py_state(state.pop("python_rng", None))
        return state

    def close(self) -> None:
        if self._tb:
            self._tb.close()
        self._tb = None


def _np_state() -> list[Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _set_np_state(s: list[Any] | None) -> None:
    if s:
        np.random.set_state((s[0], np.asarray(s[1], dtype=np.uint32), s[2], s[3], s[4]))


def _py_state() -> list[Any]:
    v, internal, g = random.getstate()
    return [v, list(internal), g]


def _set_py_state(s: list[Any] | None) -> None:
    if s:
        random.setstate((s[0], tuple(s[1]), s[2]))
