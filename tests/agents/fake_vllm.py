"""Stand-ins for vLLM's objects, so ``VLLMPolicy``'s glue and the trainer's ``rollout.backend=vllm``
path run on the CPU (the real engine is tested on a GPU in test_vllm_backend.py).

``fake_vllm_module(reply)`` is what ``mmgym.agents.vllm_backend.import_vllm`` returns in a
test (monkeypatch it): ``LLM`` is a ``FakeLLM`` answering with ``reply``, and
``SamplingParams(**kw)`` is the dict ``kw``. Not a test module: imported by tests/agents
and (by path) tests/trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import torch

Reply = Callable[[int, dict[str, Any]], str]

LOGPROB = -0.5
"""The log-prob a ``FakeLLM`` records for every token it 'samples'."""


def alternate_reply(i: int, prompt: dict[str, Any]) -> str:
    """Even prompts of a ``generate`` call answer, odd ones are malformed: the two episodes
    of every group of 2 (group-contiguous order) end with different returns."""
    return "<answer>A</answer>" if i % 2 == 0 else "I am not sure."


def fake_output(token_ids: Sequence[int], logprobs: Sequence[float], finish_reason: str = "stop") -> SimpleNamespace:
    """One ``CompletionOutput``: token ids, per-step ``{token: Logprob}`` and the finish reason."""
    return SimpleNamespace(token_ids=list(token_ids), finish_reason=finish_reason,
                           logprobs=[{t: SimpleNamespace(logprob=lp)} for t, lp in zip(token_ids, logprobs)])


class FakeLLM:
    """``vllm.LLM`` stand-in. ``kwargs``: what it was built with. ``generate`` answers
    prompt ``i`` of a call with ``reply(i, prompt)`` plus the end-of-turn token, each token
    at log-prob ``LOGPROB``, cut at ``max_tokens``. Weights load through the in-process
    path (``llm_engine.model_executor.driver_worker.model_runner.model.load_weights``);
    ``pushes`` holds a clone of every load, ``resets`` counts prefix-cache resets."""

    def __init__(self, *, reply: Reply = alternate_reply, **kwargs: Any):
        self.kwargs = kwargs
        self.reply = reply
        self.pushes: list[dict[str, torch.Tensor]] = []
        self.resets = 0
        self.calls = 0
        model = SimpleNamespace(load_weights=self._load_weights)
        worker = SimpleNamespace(model_runner=SimpleNamespace(model=model))
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=worker))
        self._tokenizer: Any = None

    def _load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        self.pushes.append({k: v.detach().clone() for k, v in weights})

    def reset_prefix_cache(self) -> None:
        self.resets += 1

    def generate(self, prompts: list[dict[str, Any]], sampling_params: list[dict[str, Any]], use_tqdm: bool = True) -> list[Any]:
        from transformers import AutoTokenizer

        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.kwargs["tokenizer"], local_files_only=True)
        self.calls += 1
        end = self._tokenizer.convert_tokens_to_ids("<|im_end|>")
        outs = []
        for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
            ids = self._tokenizer.encode(self.reply(i, prompt), add_special_tokens=False) + [end]
            cut = ids[: params["max_tokens"]]
            out = fake_output(cut, [LOGPROB] * len(cut), "stop" if len(cut) == len(ids) else "length")
            outs.append(SimpleNamespace(outputs=[out]))
        return outs


def fake_vllm_module(reply: Reply = alternate_reply) -> SimpleNamespace:
    """A ``vllm`` module stand-in; ``.engines`` lists every ``FakeLLM`` it built."""
    engines: list[FakeLLM] = []

    def llm(**kwargs: Any) -> FakeLLM:
        engine = FakeLLM(reply=reply, **kwargs)
        engines.append(engine)
        return engine

    return SimpleNamespace(LLM=llm, SamplingParams=lambda **kw: kw, engines=engines)
