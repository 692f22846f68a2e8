"""VLLMPolicy: lazy import with a clear error on CPU; real checks on a GPU with vLLM."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmgym.agents import Conversation, Message, SamplingParams, build_rollout_batch, tiny_model_path

HAS_VLLM = importlib.util.find_spec("vllm") is not None
GPU_ONLY = (not torch.cuda.is_available()) or not HAS_VLLM


def test_importing_agents_imports_no_backend():
    code = "import sys, mmgym.agents; print(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed")
def test_missing_extra_is_one_clear_error():
    from mmgym.agents import VLLMPolicy

    with pytest.raises(ImportError, match=r"mmgym\[vllm\]"):
        VLLMPolicy(tiny_model_path())


def _convs(n: int, rng: np.random.Generator) -> list[Conversation]:
    out = []
    for i in range(n):
        c = Conversation()
        c.messages.append(Message("user", "<image>\nWhat colour?", images=(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),)))
        out.append(c)
    return out


@pytest.fixture(scope="module")
def gpu_pair():
    from mmgym.agents import HFPolicy, VLLMPolicy

    learner = HFPolicy(device="cuda")
    sampler = VLLMPolicy(tiny_model_path(), learner=learner, dtype="float32", gpu_memory_utilization=0.2, enforce_eager=True)
    return learner, sampler


@pytest.mark.gpu
@pytest.mark.skipif(GPU_ONLY, reason="needs a CUDA GPU and the vllm extra")
def test_vllm_samples_two_turns_with_logprobs_the_learner_reproduces(gpu_pair):
    learner, sampler = gpu_pair
    rng = np.random.default_rng(0)
    convs = _convs(4, rng)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, seed=0)
    from mmgym.core import Trajectory, Turn

    trajs = [Trajectory(task_id=str(i)) for i in range(4)]
    for k in range(2):
        gens = sampler.generate(convs, sampling)
        for c, g, tr in zip(convs, gens, trajs):
            assert len(g.token_ids) == len(g.logprobs) >= 1 and np.isfinite(g.logprobs).all()
            assert not set(g.token_ids) & set(sampler.encoder.suppress_token_ids)
            c.add_action(g.text)
            tr.turns.append(Turn(index=k, observation=""))
            if k == 0:
                c.messages.append(Message("user", "zoom <image>", images=(rng.integers(0, 256, (112, 140, 3), dtype=np.uint8),), turn=1))
    for c, tr in zip(convs, trajs):
        c.state.fill_trajectory(tr)
        tr.info["logprob_temperature"] = sampler.logprob_temperature(sampling)
    batch = build_rollout_batch(trajs, sampler.pad_token_id)
    with torch.no_grad():
        lp = sampler.logprobs(batch).cpu()
    assert torch.allclose(lp[batch.action_mask], batch.old_logprobs[batch.action_mask], atol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(GPU_ONLY, reason="needs a CUDA GPU and the vllm extra")
def test_weight_sync_changes_vllm_outputs_like_the_learner(gpu_pair):
    learner, sampler = gpu_pair
    rng = np.random.default_rng(1)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sampler.sync()
    convs = _convs(2, rng)
    ref = learner.generate([Conversation(messages=list(c.messages)) for c in convs], greedy)
    got = sampler.generate(convs, greedy)
    assert [g.token_ids for g in got] == [g.token_ids for g in ref]


def test_vllm_glue_on_cpu_with_a_fake_engine(tiny_policy):
    """Prompt building, parameter mapping, output recording and weight loading, with
    stand-ins for vLLM's objects (fake_vllm.py; the real engine is tested on a GPU above)."""
    from fake_vllm import FakeLLM, fake_output, fake_vllm_module

    from mmgym.agents.vllm_backend import VLLMPolicy

    pol = VLLMPolicy.__new__(VLLMPolicy)
    pol.encoder = tiny_policy.encoder
    pol.learner = tiny_policy
    pol.processed_logprobs = False
    pol._bias = {i: -100.0 for i in pol.encoder.suppress_token_ids}
    pol._vllm = fake_vllm_module()
    rng = np.random.default_rng(0)
    (conv,) = _convs(1, rng)
    state = pol.encoder.sync(conv)
    prompt = pol._prompt(state)
    image_id = pol.encoder.image_token_id
    assert prompt["prompt_token_ids"].count(image_id) == 1 and state.ids().count(image_id) == 64
    assert len(prompt["multi_modal_data"]["image"]) == 1
    kw = pol._params(SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=5, stop=("</answer>",), seed=3), 2)
    assert (kw["temperature"], kw["top_p"], kw["max_tokens"], kw["seed"], kw["logprobs"]) == (0.7, 0.9, 5, 5, 0)
    assert kw["stop"] == ["</answer>"] and set(kw["logit_bias"]) == set(pol.encoder.suppress_token_ids)
    assert pol.logprob_temperature(SamplingParams(temperature=0.7)) == 1.0  # raw log-probs from old vLLM
    vocab = pol.encoder.tokenizer.get_vocab()
    ids = [vocab["<answer>"], vocab["A"], vocab["</answer>"], vocab["<|im_end|>"]]
    out = fake_output(ids, [-0.5 * (k + 1) for k in range(len(ids))])
    g = pol._record(state, out, SamplingParams())
    assert g.text == "<answer>A</answer>" and g.token_ids == ids and g.logprobs == [-0.5, -1.0, -1.5, -2.0]
    assert g.finish_reason == "stop" and state.pending is not None and state.pending.ended
    conv.add_action(g.text)
    conv.messages.append(Message("user", "next <image>", images=(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8),), turn=1))
    state = pol.encoder.sync(conv)
    assert [s.kind for s in state.segments] == ["prompt", "gen", "close", "obs"]
    assert len(pol._prompt(state)["multi_modal_data"]["image"]) == 2

    pol.llm = FakeLLM()
    pol.sync()
    assert set(pol.llm.pushes[0]) == set(tiny_policy.model.state_dict()) and pol.llm.resets == 1


def test_logprobs_without_a_learner_is_a_usage_error() -> None:
    from mmgym.agents.vllm_backend import VLLMPolicy

    pol = VLLMPolicy.__new__(VLLMPolicy)
    pol.learner = None
    with pytest.raises(RuntimeError, match=r"VLLMPolicy only samples: build it with learner=HFPolicy"):
        pol.logprobs(None)
