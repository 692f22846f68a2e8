"""ManiSkill3 tasks as mmgym VLA environments (extra ``maniskill``).

``ManiSkillEnv`` wraps any ManiSkill3 task id (``task="PickCube-v1"``) with the VLA contract
of ``mmgym.envs.vla``: the camera RGB image(s) and a language instruction per turn, and
either 7-D end-effector delta actions written as 256-bin action tokens in chunks (text) or
a ``Box`` action (continuous). Control mode ``pd_ee_delta_pose``: ``dx dy dz`` and
``droll dpitch dyaw`` in ``[-1, 1]`` (scaled by ManiSkill's controller limits), gripper +1
open / -1 closed. Registered ids: ``mmgym/ManiSkill-PickCube-v0``,
``mmgym/ManiSkill-PushCube-v0`` and ``mmgym/ManiSkill-v0`` (``task=`` any ManiSkill id).

Parallel rollouts of one task (GRPO groups), with the interface of
``mmgym.envs.runner.GroupRunner`` (``reset(seed=, task_index=, options=)`` ->
``(obs list, info list)``; ``step({i: action})`` -> ``{i: StepResult}``; ``active``,
``done``, ``close()``):

* ``ManiSkillGroup(size=G, task=...)``: one ManiSkill env with ``num_envs=G`` on the GPU
  simulator, stepped in lock-step; all G sub-envs start from the same initial state. A
  sub-env that is not stepped (finished, or not in the dict) holds still. A simulator
  failure in a sub-env (an exception, or a non-finite state) ends that sub-env's episode
  with ``termination_reason="env_error"`` and ``info["sim_error"]``, and resets it.
* ``ProcessGroup(env_fn, size)``: G worker processes holding one env each. ManiSkill's CPU
  simulator holds one env per process, so this is the CPU path. ``make_group`` picks.

ManiSkill needs a Vulkan device even for state observations. Without a GPU that is Mesa's
software driver (lavapipe), and SAPIEN needs Mesa 25 (Debian bookworm-backports): Debian
12's own Mesa 22 is rejected. Without one, building an env raises ``MissingExtraError``
naming the fix.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from mmgym.envs.runner import StepResult
from mmgym.envs.vla import ACTION_DIMS, SimStep, VLAEnv

__all__ = [
    "INSTRUCTIONS",
    "MissingExtraError",
    "ManiSkillEnv",
    "ManiSkillGroup",
    "ProcessGroup",
    "make_group",
    "maniskill_unavailable_reason",
]

INSTALL_HINT = "pip install 'mmgym[maniskill]'"
VULKAN_HINT = (
    "ManiSkill needs a Vulkan device even for state observations. Without a GPU install Mesa 25's "
    "software driver from Debian bookworm-backports (Debian 12's own Mesa 22 is rejected by SAPIEN): add a "
    "'bookworm-backports' apt source, then `apt-get install -t bookworm-backports mesa-vulkan-drivers libvulkan1` "
    "(see .ci/run and the README)"
)

# Language instructions per ManiSkill task (others get one derived from the id).
INSTRUCTIONS: dict[str, str] = {
    "PickCube-v1": "pick up the red cube and move it to the green goal position",
    "PushCube-v1": "push the blue cube to the red and white target region",
    "PullCube-v1": "pull the cube back to the target region",
    "StackCube-v1": "stack the red cube on top of the green cube",
    "LiftPegUpright-v1": "lift the peg and stand it upright",
    "PegInsertionSide-v1": "insert the peg into the hole in the box",
    "PushT-v1": "push the T-shaped block onto the T-shaped target",
    "PlaceSphere-v1": "place the sphere into the bin",
    "PokeCube-v1": "use the peg to poke the cube to the goal",
    "RollBall-v1": "roll the ball to the goal region",
}


class MissingExtraError(ImportError):
    """An optional dependency (a pip extra or a system library) is missing; the message names the fix."""


def _import_maniskill() -> Any:
    try:
        import mani_skill.envs  # noqa: F401  (registers the ManiSkill task ids)
        import gymnasium
    except ImportError as e:
        raise MissingExtraError(f"ManiSkill environments need the 'maniskill' extra ({e}); install it with `{INSTALL_HINT}`") from e
    return gymnasium


_VULKAN_REASON: list[str | None] = []


def maniskill_unavailable_reason() -> str | None:
    """``None`` when mani_skill imports and a Vulkan render device exists, else why not (cached)."""
    if _VULKAN_REASON:
        return _VULKAN_REASON[0]
    reason: str | None = None
    try:
        _import_maniskill()
        import sapien

        sapien.render.RenderSystem()
    except MissingExtraError as e:
        reason = str(e)
    except Exception as e:  # noqa: BLE001 - any failure to create a render device
        reason = f"no usable Vulkan device ({type(e).__name__}: {e}). {VULKAN_HINT}"
    _VULKAN_REASON.append(reason)
    return reason


def _looks_like_vulkan(e: BaseException) -> bool:
    msg = str(e).lower()
    return any(w in msg for w in ("vulkan", "render device", "rendering device", "vk_", "icd"))


class _ManiSkillSim:
    """A ManiSkill env with ``num_envs`` sub-envs; caches the latest observation as torch
    tensors and converts only what is asked for to numpy."""

    def __init__(self, task: str, num_envs: int, *, obs_mode: str, control_mode: str, image_size: int | None, sim_backend: str, cameras: tuple[str, ...] | None):
        gym = _import_maniskill()
        kwargs: dict[str, Any] = dict(num_envs=num_envs, obs_mode=obs_mode, control_mode=control_mode, sim_backend=sim_backend)
        if image_size is not None:
            kwargs["sensor_configs"] = dict(width=int(image_size), height=int(image_size))
        try:
            self.env = gym.make(task, **kwargs).unwrapped
        except MissingExtraError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with the fix when it is Vulkan
            if _looks_like_vulkan(e):
                raise MissingExtraError(f"cannot start ManiSkill task {task!r}: {e}. {VULKAN_HINT}") from e
            raise
        self.num_envs = int(num_envs)
        self.task = task
        self.cameras = cameras
        self.obs: dict[str, Any] = {}
        self.info: dict[str, Any] = {}
        from mani_skill.utils.registration import REGISTERED_ENVS

        spec = REGISTERED_ENVS.get(task)
        self.max_episode_steps = int(spec.max_episode_steps) if spec is not None and spec.max_episode_steps else 100

    # -------------------------------------------------------------- control
    def reset(self, seed: int, *, same_state: bool = True) -> None:
        """Reset every sub-env with ``seed``; with ``same_state`` all copy sub-env 0's state."""
        obs, info = self.env.reset(seed=int(seed))
        if same_state and self.num_envs > 1:
            import torch

            state = self.env.get_state()
            state = state[:1].expand(self.num_envs, -1).clone() if isinstance(state, torch.Tensor) else state
            obs, info = self.env.reset(options={"reset_to_env_states": {"env_states": state}})
        self.obs, self.info = obs, info

    def reset_index(self, i: int, seed: int) -> None:
        """Partial reset of sub-env ``i`` (after a simulator failure)."""
        import torch

        if self.num_envs == 1:
            self.reset(seed)
            return
        obs, info = self.env.reset(seed=int(seed), options={"env_idx": torch.tensor([i], device=self.env.device)})
        self.obs, self.info = obs, info

    def step(self, actions: np.ndarray) -> list[SimStep]:
        """``actions`` ``(num_envs, 7)`` -> one ``SimStep`` per sub-env."""
        import torch

        try:
            a = torch.as_tensor(actions, dtype=torch.float32, device=self.env.device)
            obs, _rew, _term, _trunc, info = self.env.step(a)
        except Exception as e:  # noqa: BLE001 - a simulator failure, recorded per sub-env
            msg = f"{type(e).__name__}: {str(e)[:200]}"
            return [SimStep(success=False, error=msg) for _ in range(self.num_envs)]
        self.obs, self.info = obs, info
        success = _to_np(info.get("success", torch.zeros(self.num_envs, dtype=torch.bool))).reshape(-1)
        grasped = _to_np(info["is_grasped"]).reshape(-1) if "is_grasped" in info else np.zeros(self.num_envs, bool)
        finite = self._finite()
        return [
            SimStep(success=bool(success[i]), grasped=bool(grasped[i]), error=None if finite[i] else "non-finite simulator state")
            for i in range(self.num_envs)
        ]

    @property
    def has_grasp(self) -> bool:
        return "is_grasped" in self.info

    # -------------------------------------------------------------- observations
    def _finite(self) -> np.ndarray:
        p = self.proprio_all()
        return np.isfinite(p).all(axis=1) if p.size else np.ones(self.num_envs, bool)

    def camera_names(self) -> list[str]:
        sd = self.obs.get("sensor_data", {}) if isinstance(self.obs, dict) else {}
        names = [k for k, v in sd.items() if isinstance(v, dict) and "rgb" in v]
        return [n for n in names if self.cameras is None or n in self.cameras]

    def images(self, i: int) -> tuple[np.ndarray, ...]:
        sd = self.obs.get("sensor_data", {}) if isinstance(self.obs, dict) else {}
        return tuple(np.ascontiguousarray(_to_np(sd[n]["rgb"][i])[..., :3], dtype=np.uint8) for n in self.camera_names())

    def proprio_all(self) -> np.ndarray:
        """``(num_envs, D)``: joint positions, then the TCP pose when the task reports it."""
        if not isinstance(self.obs, dict):
            return np.zeros((self.num_envs, 0), np.float32)
        parts = []
        agent, extra = self.obs.get("agent", {}), self.obs.get("extra", {})
        if "qpos" in agent:
            parts.append(_to_np(agent["qpos"]).reshape(self.num_envs, -1))
        if "tcp_pose" in extra:
            parts.append(_to_np(extra["tcp_pose"]).reshape(self.num_envs, -1))
        return np.concatenate(parts, axis=1).astype(np.float32) if parts else np.zeros((self.num_envs, 0), np.float32)

    def state_key(self, i: int) -> bytes:
        p = self.proprio_all()[i]
        return np.round(np.nan_to_num(p) / 0.02).astype(np.int64).tobytes()

    def close(self) -> None:
        self.env.close()


def _to_np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


class ManiSkillEnv(VLAEnv):
    """A ManiSkill3 task as an mmgym VLA env (see the module docstring).

    Args:
        task: a ManiSkill3 task id, e.g. ``"PickCube-v1"``, ``"PushCube-v1"``, ``"StackCube-v1"``.
        obs_mode: ManiSkill observation mode; ``"rgb"`` gives camera images.
        control_mode: ManiSkill controller; the 7-D action contract needs ``"pd_ee_delta_pose"``.
        image_size: camera side in px (``None``: the task's default, 128 for the tabletop tasks).
        cameras: camera names to show (``None``: every RGB camera, one ``<image>`` each).
        sim_backend: ``"auto"``, ``"cpu"`` or ``"gpu"`` (ManiSkill's names).
        max_steps: control steps per episode (``None``: the task's registered episode length).
        (others: see ``mmgym.envs.vla.VLAEnv``)
    """

    description = "A ManiSkill3 task with camera images and an instruction; 7-D action tokens in chunks (VLA)."
    proprio_dim = 16

    def __init__(
        self,
        *,
        task: str = "PickCube-v1",
        obs_mode: str = "rgb",
        control_mode: str = "pd_ee_delta_pose",
        image_size: int | None = 128,
        cameras: tuple[str, ...] | list[str] | None = None,
        sim_backend: str = "auto",
        max_steps: int | None = None,
        _sim: _ManiSkillSim | None = None,
        **kwargs: Any,
    ):
        self.task_name = str(task)
        self._shared = _sim is not None
        self._sim = _sim or _ManiSkillSim(task, 1, obs_mode=obs_mode, control_mode=control_mode, image_size=image_size, sim_backend=sim_backend, cameras=tuple(cameras) if cameras else None)
        self._index = 0
        self._pending: tuple[str, str] | None = None
        if not self._sim.obs:
            self._sim.reset(0)
        self.proprio_dim = int(self._sim.proprio_all().shape[1])
        self.needs_grasp = self._sim.has_grasp
        super().__init__(max_steps=max_steps or self._sim.max_episode_steps, **kwargs)
        self.description = f"ManiSkill3 {self.task_name}: {INSTRUCTIONS.get(self.task_name, self.task_name)}"

    def _instruction(self) -> str:
        name = self.task_name.split("-v")[0]
        return INSTRUCTIONS.get(self.task_name, f"complete the {name} task")

    # -------------------------------------------------------------- sim hooks
    def _sim_reset(self, rng: np.random.Generator, index: int | None) -> tuple[str, str]:
        if self._shared:
            assert self._pending is not None, "a group view is reset by its ManiSkillGroup"
            return self._pending
        seed = int(index) if index is not None else int(rng.integers(2**31))
        self._sim.reset(seed)
        return f"{self.task_name}-seed{seed}", self._instruction()

    def _sim_step(self, action: np.ndarray) -> SimStep:
        # a failure ends the episode (env_error); the next reset() starts the sim afresh
        return self._sim.step(action.reshape(1, ACTION_DIMS))[0]

    def _sim_images(self) -> tuple[np.ndarray, ...]:
        return self._sim.images(self._index)

    def _sim_proprio(self) -> np.ndarray:
        return self._sim.proprio_all()[self._index]

    def _sim_state_key(self) -> bytes:
        return self._sim.state_key(self._index)

    def close(self) -> None:
        if not self._shared:
            self._sim.close()


class ManiSkillGroup:
    """G rollouts of one ManiSkill task in lock-step on one batched env (``num_envs=G``).

    Same interface as ``mmgym.envs.runner.GroupRunner``. Each sub-env is a ``ManiSkillEnv``
    view (``self.envs[i]``) that keeps its own episode state (turns, invalid replies,
    reward terms) while the physics runs batched; ManiSkill's batched simulator needs
    the GPU backend (``sim_backend="gpu"``).
    """

    def __init__(self, size: int, *, task: str = "PickCube-v1", obs_mode: str = "rgb", control_mode: str = "pd_ee_delta_pose", image_size: int | None = 128, cameras: tuple[str, ...] | None = None, sim_backend: str = "gpu", **env_kwargs: Any):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.sim = _ManiSkillSim(task, size, obs_mode=obs_mode, control_mode=control_mode, image_size=image_size, sim_backend=sim_backend, cameras=cameras)
        self.sim.reset(0)
        self.envs = [ManiSkillEnv(task=task, _sim=self.sim, **env_kwargs) for _ in range(size)]
        for i, env in enumerate(self.envs):
            env._index = i
        self.active: set[int] = set()
        self.sim_errors: list[tuple[int, str]] = []  # (sub-env, message), for logs

    def __len__(self) -> int:
        return len(self.envs)

    def reset(self, *, seed: int | None = None, task_index: int | None = None, options: dict | None = None) -> tuple[list[dict], list[dict]]:
        """All G sub-envs start the same task: ``task_index`` is the ManiSkill seed, else one drawn from ``seed``."""
        rng = np.random.default_rng(seed)
        sim_seed = int(task_index) if task_index is not None else int(rng.integers(2**31))
        self.sim.reset(sim_seed, same_state=True)
        opts = {k: v for k, v in (options or {}).items() if k != "task_index"}
        obs, infos = [], []
        for env in self.envs:
            env._pending = (f"{env.task_name}-seed{sim_seed}", env._instruction())
            o, info = env.reset(seed=seed, options=opts)
            obs.append(o)
            infos.append(info)
        self.active = set(range(len(self.envs)))
        return obs, infos

    def step(self, actions: dict[int, Any]) -> dict[int, StepResult]:
        """Step sub-env ``i`` with ``actions[i]``; every other sub-env holds still meanwhile."""
        unknown = [i for i in actions if i not in self.active]
        if unknown:
            raise ValueError(f"envs {sorted(unknown)} are not active (finished or never reset); active: {sorted(self.active)}")
        turns = {i: self.envs[i].begin_turn(a) for i, a in actions.items()}
        running = set(turns)
        chunk = self.envs[0].chunk_size
        failed: dict[int, str] = {}
        for k in range(chunk):
            if not running:
                break
            batch = np.stack([turns[j].actions[k] if j in running else self.envs[j].hold_actions()[0] for j in range(len(self.envs))])
            results = self.sim.step(batch)
            for j, res in enumerate(results):
                if res.error is not None and j not in running:
                    failed.setdefault(j, res.error)
            for j in list(running):
                if self.envs[j].apply_sim_step(turns[j], results[j]):
                    running.discard(j)
                    if results[j].error is not None:
                        failed[j] = results[j].error
        out: dict[int, StepResult] = {}
        for i, turn in turns.items():
            obs, r, term, trunc, info = self.envs[i].end_turn(turn)
            out[i] = StepResult(obs, float(r), bool(term), bool(trunc), info)
            if term or trunc:
                self.active.discard(i)
        for j, msg in sorted(failed.items()):
            # a failed sub-env is reset so the batch stays healthy; its episode (if it was
            # stepped) already ended with termination_reason="env_error"
            self.sim_errors.append((j, msg))
            self.active.discard(j)
            self.sim.reset_index(j, seed=j)
        return out

    @property
    def done(self) -> bool:
        return not self.active

    def close(self) -> None:
        self.sim.close()


# ---------------------------------------------------------------------- worker processes
def _worker(conn: Any, env_fn: Callable[[], Any]) -> None:
    env = None
    try:
        env = env_fn()
        conn.send(("ok", None))
        while True:
            cmd, arg = conn.recv()
            if cmd == "reset":
                conn.send(("ok", env.reset(**arg)))
            elif cmd == "step":
                conn.send(("ok", env.step(arg)))
            elif cmd == "close":
                break
    except (EOFError, KeyboardInterrupt):
        pass
    except Exception as e:  # noqa: BLE001 - reported to the parent, which re-raises
        try:
            conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}"))
        except (BrokenPipeError, OSError):
            pass
    finally:
        if env is not None:
            env.close()
        conn.close()


class _EnvFromId:
    """A picklable ``env_fn``: ``gymnasium.make(env_id, **kwargs)`` in the worker."""

    def __init__(self, env_id: str, kwargs: dict[str, Any]):
        self.env_id, self.kwargs = env_id, dict(kwargs)

    def __call__(self) -> Any:
        import gymnasium

        import mmgym  # noqa: F401  (registers the ids in a spawned worker)

        return gymnasium.make(self.env_id, **self.kwargs)


class ProcessGroup:
    """G envs in G worker processes (spawned), with ``GroupRunner``'s interface.

    ``env_fn`` must be picklable (``ProcessGroup.from_id("mmgym/ManiSkill-PickCube-v0", 4)``
    builds one). All envs get the same ``seed``/``task_index``, hence the same task.
    """

    def __init__(self, env_fn: Callable[[], Any], size: int, *, context: str = "spawn"):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        ctx = mp.get_context(context)
        self._conns = []
        self._procs = []
        for _ in range(size):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(child, env_fn), daemon=True)
            p.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(p)
        for c in self._conns:
            self._recv(c)
        self.active: set[int] = set()

    @classmethod
    def from_id(cls, env_id: str, size: int, **kwargs: Any) -> ProcessGroup:
        return cls(_EnvFromId(env_id, kwargs), size)

    @staticmethod
    def _recv(conn: Any) -> Any:
        status, payload = conn.recv()
        if status != "ok":
            raise RuntimeError(f"env worker failed: {payload}")
        return payload

    def __len__(self) -> int:
        return len(self._conns)

    def reset(self, *, seed: int | None = None, task_index: int | None = None, options: dict | None = None) -> tuple[list[dict], list[dict]]:
        opts = dict(options or {})
        if task_index is not None:
            opts["task_index"] = task_index
        for c in self._conns:
            c.send(("reset", {"seed": seed, "options": dict(opts)}))
        results = [self._recv(c) for c in self._conns]
        self.active = set(range(len(self._conns)))
        return [r[0] for r in results], [r[1] for r in results]

    def step(self, actions: dict[int, Any]) -> dict[int, StepResult]:
        unknown = [i for i in actions if i not in self.active]
        if unknown:
            raise ValueError(f"envs {sorted(unknown)} are not active (finished or never reset); active: {sorted(self.active)}")
        for i, a in actions.items():
            self._conns[i].send(("step", a))
        out: dict[int, StepResult] = {}
        for i in actions:
            obs, r, term, trunc, info = self._recv(self._conns[i])
            out[i] = StepResult(obs, float(r), bool(term), bool(trunc), info)
            if term or trunc:
                self.active.discard(i)
        return out

    @property
    def done(self) -> bool:
        return not self.active

    def close(self) -> None:
        for c in self._conns:
            try:
                c.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
        self._conns, self._procs = [], []


def make_group(size: int, *, env_id: str = "mmgym/ManiSkill-PickCube-v0", mode: str = "auto", **kwargs: Any) -> ManiSkillGroup | ProcessGroup:
    """A group of ``size`` rollouts: batched on the GPU simulator when CUDA is available
    (``mode="batched"``), else worker processes (``mode="processes"``)."""
    if mode == "auto":
        try:
            import torch

            mode = "batched" if torch.cuda.is_available() else "processes"
        except ImportError:
            mode = "processes"
    if mode == "batched":
        from gymnasium.envs.registration import registry

        merged = {**registry[env_id].kwargs, **kwargs}
        return ManiSkillGroup(size, **merged)
    if mode == "processes":
        return ProcessGroup.from_id(env_id, size, **kwargs)
    raise ValueError(f"mode must be 'auto', 'batched' or 'processes', got {mode!r}")
