"""Train with TRL's GRPOTrainer against an mmgym env served by ``mmgym serve`` (extra: trl).

    mmgym serve mmgym/ChainOfFocus-v0 --port 8000          # terminal 1
    python examples/trl_remote_env.py --url http://127.0.0.1:8000   # terminal 2

TRL's environment integration (``GRPOTrainer(..., rollout_func=...)``) lets a custom rollout
function generate completions and report extra per-sample fields that reward functions receive
as keyword arguments. Here each prompt is one mmgym episode: the env's first observation is the
prompt, the model's reply is the action sent to the server's ``/step``, and the env's verified
reward comes back as ``env_reward``. Single-turn on purpose (one reply per episode, which is
how the generic TRL loop is shaped); multi-turn training is mmgym's own trainer's job.

Not run in the test suite: it needs TRL, a model and (for vLLM generation) a GPU. The server
side of the exchange is what ``tests/envs/test_server.py`` checks, with OpenEnv's own client.
"""

from __future__ import annotations

import argparse
from typing import Any

from mmgym.envs.remote import RemoteEnv


def make_dataset(url: str, n: int) -> Any:
    """Prompts = first observations of tasks 0..n-1 (text; images travel as PNG in the env)."""
    from datasets import Dataset

    env = RemoteEnv(url)
    rows = []
    for k in range(n):
        obs, info = env.reset(options={"task_index": k})
        rows.append({"prompt": [{"role": "user", "content": obs["text"]}], "task_index": k})
    env.close()
    return Dataset.from_list(rows)


def make_rollout_func(url: str) -> Any:
    """A TRL ``rollout_func(prompts, trainer)``: generate, step the remote env, return rewards."""
    from trl.experimental.openenv import generate_rollout_completions

    def rollout_func(prompts: list[Any], trainer: Any) -> dict[str, list]:
        outputs = generate_rollout_completions(trainer, prompts)
        tokenizer = trainer.processing_class
        env = RemoteEnv(url)
        rewards = []
        for prompt, out in zip(prompts, outputs):
            text = tokenizer.decode(out["completion_ids"], skip_special_tokens=True)
            env.reset(options={"task_index": int(prompt.get("task_index", 0)) if isinstance(prompt, dict) else 0})
            _, reward, _, _, _ = env.step(text)
            rewards.append(float(reward))
        env.close()
        return {
            "prompt_ids": [o["prompt_ids"] for o in outputs],
            "completion_ids": [o["completion_ids"] for o in outputs],
            "logprobs": [o["logprobs"] for o in outputs],
            "env_reward": rewards,
        }

    return rollout_func


def env_reward(completions: list[Any], env_reward: list[float] | None = None, **kwargs: Any) -> list[float]:
    """Reward function: the verified reward the env returned for each completion."""
    return [float(r) for r in (env_reward or [0.0] * len(completions))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
    ap.add_argument("--tasks", type=int, default=64)
    args = ap.parse_args()
    from trl import GRPOConfig, GRPOTrainer

    cfg = GRPOConfig(output_dir="runs/trl_remote_env", use_vllm=True, vllm_mode="colocate", num_generations=4, per_device_train_batch_size=4, max_completion_length=256, logging_steps=1)
    trainer = GRPOTrainer(model=args.model, reward_funcs=[env_reward], args=cfg, train_dataset=make_dataset(args.url, args.tasks), rollout_func=make_rollout_func(args.url))
    trainer.train()


if __name__ == "__main__":
    main()
