from __future__ import annotations

import json
import subprocess
import sys

import cv2
import gymnasium as gym
import numpy as np
import pytest

import mmgym  # noqa: F401
from mmgym.agents.episodes import run_episode
from mmgym.agents.scripted import OracleAgent
from mmgym.envs.datasets import DatasetError
from mmgym.envs.runner import GroupRunner


def test_vqa_procedural_oracle_and_answer_types() -> None:
    env = gym.make("mmgym/VQA-v0")
    kinds = set()
    for i in range(60):
        t = run_episode(env, OracleAgent(), seed=i, keep_images=False)
        assert t.success, t.task_id
        kinds.add(env.unwrapped.task.answer_type)
    assert kinds == {"choice", "exact", "numeric"}


def test_vqa_wrong_answers_score_zero() -> None:
    env = gym.make("mmgym/VQA-v0", answer_types=("numeric",))
    env.reset(seed=0)
    truth = env.unwrapped.task.answer
    *_, info = env.step(f"<answer>{truth + 1:g}</answer>")
    assert info["success"] is False and info["reward_terms"]["accuracy"] == 0.0


def test_vqa_jsonl_dataset(tmp_path) -> None:
    (tmp_path / "img").mkdir()
    cv2.imwrite(str(tmp_path / "img" / "a.png"), np.zeros((20, 30, 3), np.uint8))
    rows = [
        {"image": "img/a.png", "question": "Colour?", "options": ["red", "black"], "answer": "black"},
        {"image": "img/a.png", "question": "How many?", "answer": 3},
        {"image": "img/a.png", "question": "Name?", "answer": "Box", "answer_type": "exact"},
        {"image": "../escape.png", "question": "q", "answer": 1},
        {"image": "img/missing.png", "question": "q", "answer": 1},
        {"question": "no image", "answer": 1},
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    with pytest.warns(UserWarning, match="skipped 4 bad row"):
        env = gym.make("mmgym/VQA-v0", dataset=str(tmp_path))
    assert env.unwrapped.num_tasks() == 3
    answers = {0: "B", 1: "3.0", 2: "box"}
    for i, a in answers.items():
        env.reset(seed=0, options={"task_index": i})
        *_, info = env.step(f"<answer>{a}</answer>")
        assert info["success"], (i, a)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "data.jsonl").write_text('{"image": "nope.png", "question": "q", "answer": 1}\n')
    with pytest.raises(DatasetError, match="no valid row"), pytest.warns(UserWarning):
        gym.make("mmgym/VQA-v0", dataset=str(tmp_path / "bad"))


@pytest.mark.parametrize("vec", ["sync", "async"])
def test_vector_envs(vec: str) -> None:
    fns = [lambda: gym.make("mmgym/ChainOfFocus-v0", canvas=(512, 640)) for _ in range(2)]
    venv = gym.vector.SyncVectorEnv(fns) if vec == "sync" else gym.vector.AsyncVectorEnv(fns, shared_memory=False)
    try:
        obs, info = venv.reset(seed=[0, 1])
        assert len(obs["text"]) == 2 and all(t.count("<image>") == 1 for t in obs["text"])
        obs, r, term, trunc, info = venv.step(["<answer>A</answer>", "junk"])
        assert term[0] and not term[1] and r.shape == (2,)
    finally:
        venv.close()


def test_group_runner_steps_only_active_envs() -> None:
    runner = GroupRunner(env_fn=lambda: gym.make("mmgym/ChainOfFocus-v0", canvas=(512, 640)), size=3)
    obs, infos = runner.reset(seed=5)
    assert len({i["task_id"] for i in infos}) == 1  # same task across the group
    res = runner.step({0: "<answer>A</answer>", 1: runner.envs[1].unwrapped.oracle_action(), 2: "junk"})
    assert res[0].done and not res[1].done and runner.active == {1, 2}
    with pytest.raises(ValueError, match="not active"):
        runner.step({0: "x"})
    res = runner.step({1: runner.envs[1].unwrapped.oracle_action()})
    assert res[1].done and res[1].info["success"]
    obs, infos = runner.reset(task_index=4)
    assert {i["task_id"] for i in infos} == {"focus-4"} and runner.active == {0, 1, 2}


def test_cli_play_writes_pages(tmp_path) -> None:
    out = tmp_path / "play"
    p = subprocess.run([sys.executable, "-m", "mmgym.cli", "play", "mmgym/ChainOfFocus-v0", "--agent", "oracle", "--episodes", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert (out / "index.html").exists() and (out / "episode_001.html").exists()
    assert list((out / "episode_000_files").glob("*.png"))
    assert '"success": 1.0' in p.stdout
    bad = subprocess.run([sys.executable, "-m", "mmgym.cli", "play", "mmgym/Nope-v0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown env" in bad.stderr


def test_group_runner_unseeded_reset_still_shares_one_task() -> None:
    runner = GroupRunner(env_fn=lambda: gym.make("mmgym/ChainOfFocus-v0", canvas=(256, 320)), size=3)
    _, infos = runner.reset()
    assert len({i["task_id"] for i in infos}) == 1
