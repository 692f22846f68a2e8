from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pytest

from mmgym.core import ConfigError, RGBImage, Registry, RegistryError, ToolCall, Trajectory, Turn, UnicodeText, load_config


def test_unicode_text_accepts_any_str_within_bounds() -> None:
    sp = UnicodeText(10, min_length=1)
    assert sp.contains("<{é}>\n")
    assert not sp.contains("")
    assert not sp.contains("x" * 11)
    assert not sp.contains(b"bytes")
    sp.seed(0)
    for _ in range(50):
        assert sp.contains(sp.sample())


def test_rgb_image_space() -> None:
    sp = RGBImage(64)
    assert sp.contains(np.zeros((5, 7, 3), np.uint8))
    assert not sp.contains(np.zeros((5, 7, 3), np.float32))
    assert not sp.contains(np.zeros((5, 7), np.uint8))
    assert not sp.contains(np.zeros((65, 7, 3), np.uint8))
    sp.seed(1)
    assert sp.contains(sp.sample())


def test_records_are_slotted() -> None:
    t = Turn(index=0, observation="x")
    with pytest.raises(AttributeError):
        t.not_a_field = 1  # type: ignore[attr-defined]
    traj = Trajectory(task_id="a", turns=[Turn(0, "o", reward=0.5, reward_terms={"a": 0.5}), Turn(1, "p", reward=1.0, reward_terms={"a": 1.0}, tool_calls=(ToolCall("zoom", {}),))])
    assert traj.total_reward == 1.5 and traj.num_tool_calls == 1 and traj.reward_terms() == {"a": 1.5}


def test_registry() -> None:
    r: Registry[int] = Registry("estimator")
    r.register("grpo", 1)
    r.register("grpo", 1)  # same object again: fine

    @r.register("rloo")
    def _f() -> None: ...

    with pytest.raises(RegistryError, match="already registered"):
        r.register("grpo", 2)
    with pytest.raises(RegistryError, match="unknown estimator 'grpp'; known: grpo, rloo"):
        r.get("grpp")
    assert "rloo" in r and len(r) == 2


@dataclass(frozen=True)
class Algo:
    clip_high: float = 0.2
    name: Literal["grpo", "rloo"] = "grpo"
    groups: tuple[int, ...] = (8,)


@dataclass(frozen=True)
class Cfg:
    algo: Algo = field(default_factory=Algo)
    seed: int = 0
    out: str | None = None
    debug: bool = False


def test_config_layers(tmp_path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("seed: 3\nalgo:\n  clip_high: 0.25\n  groups: [4, 8]\n")
    cfg = load_config(Cfg, y, ["algo.clip_high=0.28", "out=runs/x", "algo.name=rloo"])
    assert cfg == Cfg(algo=Algo(0.28, "rloo", (4, 8)), seed=3, out="runs/x")
    assert load_config(Cfg).algo.clip_high == 0.2
    assert load_config(Cfg, overrides=["algo.clip_high=1e-3"]).algo.clip_high == 0.001


@pytest.mark.parametrize(
    "override,msg",
    [
        ("algo.clip_hgh=0.3", "unknown config key 'algo.clip_hgh'; did you mean 'algo.clip_high'"),
        ("seed=abc", "config key 'seed': expected an int"),
        ("algo.name=ppo", "config key 'algo.name'"),
        ("debug=3", "config key 'debug': expected true/false"),
        ("algo=5", "expected a mapping for section Algo"),
        ("noequals", "must look like key=value"),
    ],
)
def test_config_errors_name_the_key(override: str, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        load_config(Cfg, overrides=[override])


def test_config_missing_file_and_bad_yaml(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Cfg, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(Cfg, bad)


@dataclass(frozen=True)
class Outer:
    algo: Algo = field(default_factory=lambda: Algo(clip_high=0.5, name="rloo"))
    extra: dict = field(default_factory=lambda: {"a": 1, "b": {"c": 2}})


def test_partial_section_keeps_the_parent_default() -> None:
    cfg = load_config(Outer, overrides=["algo.groups=[2]", "extra.b.d=3"])  # overrides merge into dicts
    assert cfg.algo == Algo(clip_high=0.5, name="rloo", groups=(2,))  # not Algo()'s own defaults
    assert cfg.extra == {"a": 1, "b": {"c": 2, "d": 3}}


def test_yaml_dict_block_replaces_the_default_dict(tmp_path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("extra: {z: 9}\nalgo: {groups: [3]}\n")
    cfg = load_config(Outer, y)
    assert cfg.extra == {"z": 9} and cfg.algo == Algo(clip_high=0.5, name="rloo", groups=(3,))
