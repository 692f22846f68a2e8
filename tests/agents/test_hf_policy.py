"""HFPolicy on the embedded tiny Qwen2.5-VL: sampling, log-probs, budget, bad input, LoRA."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mmgym.agents import (
    Conversation,
    HFPolicy,
    LoraSettings,
    Message,
    ModelLoadError,
    SamplingParams,
    TokenState,
    build_rollout_batch,
    tiny_model_path,
)
from mmgym.core import Trajectory, Turn

TOOLS = [{"type": "function", "function": {"name": "zoom", "description": "Zoom into a region.",
                                           "parameters": {"type": "object", "properties": {"region": {"type": "integer"}}}}}]

# Qwen2.5-VL-Instruct's own chat template (it ignores ``tools=``).
QWEN25VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _task(img: np.ndarray, tools=TOOLS) -> Conversation:
    conv = Conversation(tools=tools)
    conv.messages.append(Message("user", "<image>\nWhat colour is the framed square?", images=(img,), turn=0))
    return conv


def _play(policy: HFPolicy, convs: list[Conversation], turns: int, sampling: SamplingParams, make_image,
          replies: list[list[str]] | None = None) -> list[Trajectory]:
    """Generate ``turns`` replies per conversation; a zoom image follows every reply."""
    trajs = [Trajectory(task_id=str(i)) for i in range(len(convs))]
    for k in range(turns):
        gens = policy.generate(convs, sampling)
        for i, (conv, g, tr) in enumerate(zip(convs, gens, trajs)):
            assert g.finish_reason in ("stop", "length"), g.error
            if replies is not None:
                replies[i].append(g.text)
            conv.add_action(g.text)
            tr.turns.append(Turn(index=k, observation=conv.last_observation().text))
            if k + 1 < turns:
                conv.messages.append(Message("user", f"Zoom {k}: <image>", images=(make_image(112 + 28 * i, 140),), turn=k + 1))
    for conv, tr in zip(convs, trajs):
        conv.state.fill_trajectory(tr)
        tr.info["logprob_temperature"] = sampling.logprob_temperature
    return trajs


def _image_runs(ids: list[int], image_id: int) -> list[tuple[int, int]]:
    runs, start = [], None
    for j, t in enumerate(ids + [-1]):
        if t == image_id and start is None:
            start = j
        elif t != image_id and start is not None:
            runs.append((start, j))
            start = None
    return runs


def test_generate_records_token_ids_and_logprobs(tiny_policy, make_image):
    convs = [_task(make_image(150 + 20 * i, 224)) for i in range(6)]
    gens = tiny_policy.generate(convs, SamplingParams(temperature=1.0, max_new_tokens=16, seed=1))
    assert len(gens) == 6
    for g in gens:
        assert 1 <= len(g.token_ids) == len(g.logprobs) <= 16
        assert all(np.isfinite(g.logprobs)) and max(g.logprobs) <= 0.0
        assert g.text == tiny_policy.tokenizer.decode(g.token_ids, skip_special_tokens=True)
        ended = g.token_ids[-1] in tiny_policy.eos_token_ids
        assert g.finish_reason == ("stop" if ended else "length")
        assert ended or len(g.token_ids) == 16
    # the same seed gives the same samples
    again = tiny_policy.generate([_task(c.messages[0].images[0]) for c in convs], SamplingParams(max_new_tokens=16, seed=1))
    assert [g.token_ids for g in again] == [g.token_ids for g in gens]


def test_vision_special_tokens_are_never_sampled(tiny_policy, make_image):
    vocab = tiny_policy.tokenizer.get_vocab()
    vision = {vocab[t] for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")}
    assert vision <= set(tiny_policy.suppress_token_ids)
    gens = tiny_policy.generate([_task(make_image()) for _ in range(8)], SamplingParams(temperature=5.0, max_new_tokens=32, seed=0))
    sampled = {t for g in gens for t in g.token_ids}
    assert len(sampled) > 50  # a flat distribution really was sampled from
    assert not sampled & set(tiny_policy.suppress_token_ids)


def test_multi_turn_logprobs_match_sampler_and_images_are_encoded_once(tiny_policy, make_image):
    tiny_policy.vision_stats.reset()
    convs = [_task(make_image(224, 180 + 8 * i)) for i in range(4)]
    trajs = _play(tiny_policy, convs, 3, SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=12, seed=3), make_image)
    assert sum(len(c.images()) for c in convs) == 12
    assert tiny_policy.vision_stats.images_encoded == 12  # 4 tasks + 2 zooms each: once per image
    assert tiny_policy.vision_stats.images_reused == 4 + 8  # turn 1 reuses 4, turn 2 reuses 8
    batch = build_rollout_batch(trajs, tiny_policy.pad_token_id)
    assert batch.extras["temperature"].tolist() == pytest.approx([0.8] * 4)
    with torch.no_grad():
        lp = tiny_policy.logprobs(batch)
    assert lp.shape == batch.input_ids.shape
    assert torch.allclose(lp[batch.action_mask], batch.old_logprobs[batch.action_mask], atol=1e-4)
    assert (lp[~batch.action_mask] == 0).all()
    for tr, conv in zip(trajs, convs):
        assert [t.token_span is not None for t in tr.turns] == [True] * 3
        assert sum(tr.action_mask) == sum(e - s for s, e in (t.token_span for t in tr.turns))


def test_logprobs_are_differentiable_through_the_vision_tower(tiny_policy, make_image):
    convs = [_task(make_image()) for _ in range(2)]
    trajs = _play(tiny_policy, convs, 1, SamplingParams(max_new_tokens=6, seed=0), make_image)
    batch = build_rollout_batch(trajs, tiny_policy.pad_token_id)
    model = tiny_policy.model
    try:
        lp = tiny_policy.logprobs(batch)
        (-lp.sum()).backward()
        visual = model.model.visual
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in visual.parameters())
    finally:
        model.zero_grad(set_to_none=True)


def test_stop_strings_cut_the_reply(tiny_policy, make_image):
    img = make_image()
    sampling = SamplingParams(temperature=1.0, max_new_tokens=20, seed=5)
    (full,) = tiny_policy.generate([_task(img)], sampling)
    assert len(full.token_ids) >= 8 and full.finish_reason == "length"
    tok = tiny_policy.tokenizer
    stop = tok.decode(full.token_ids[4:6], skip_special_tokens=False)
    first = tok.decode(full.token_ids, skip_special_tokens=False).index(stop)
    (cut,) = tiny_policy.generate([_task(img)], SamplingParams(temperature=1.0, max_new_tokens=20, seed=5, stop=(stop, "never")))
    assert cut.finish_reason == "stop" and cut.text.index(stop) == first
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)] and len(cut.token_ids) <= 6
    assert cut.logprobs == pytest.approx(full.logprobs[: len(cut.logprobs)], abs=1e-5)
    assert stop not in tok.decode(cut.token_ids[:-1], skip_special_tokens=False)  # cut at the first match


def test_overflow_drops_whole_turns_and_never_cuts_an_image(tiny_policy, make_image):
    """The verl crash case: a multi-turn prompt longer than the context whose naive
    left-truncation would cut the task image in half."""
    max_new, image_id = 8, tiny_policy.image_token_id
    greedy = SamplingParams(temperature=0.0, max_new_tokens=max_new)
    images = [make_image(224, 224) for _ in range(4)]

    def fresh() -> Conversation:
        return _task(images[0], tools=None)

    def play(conv: Conversation, turns: int) -> list[str]:
        out = []
        for k in range(turns):
            (g,) = tiny_policy.generate([conv], greedy)
            assert g.finish_reason in ("stop", "length"), g.error
            out.append(g.text)
            conv.add_action(g.text)
            if k + 1 < turns:
                conv.messages.append(Message("user", f"Zoom {k}: <image>", images=(images[k + 1],), turn=k + 1))
        return out

    # 1) probe with an unbounded context: prompt lengths before turns 2 and 3
    probe = fresh()
    play(probe, 3)
    len_turn2 = len(probe.state) - len(probe.state.segments[-1])
    probe.messages.append(Message("user", "Zoom 2: <image>", images=(images[3],), turn=3))
    tiny_policy.encoder.sync(probe)
    full_ids = probe.state.ids()
    first_image = _image_runs(full_ids, image_id)[0]
    cut = first_image[0] + 20  # naive truncation keeping the last tokens starts inside the task image
    max_context = len(full_ids) - cut + max_new
    assert max_context >= len_turn2 + max_new  # turns 0-2 fit; turn 3 overflows

    naive = full_ids[cut:]
    n_img_tokens = sum(t == image_id for t in naive)
    assert n_img_tokens % 64 != 0  # the naive prompt holds a partial image ...
    model_inputs = probe.state.export()[4]
    with pytest.raises(Exception, match="[Ii]mage features and image tokens do not match"):
        with torch.no_grad():  # ... and the model rejects it, as in verl #4050 / #1640
            tiny_policy.model(input_ids=torch.tensor([naive]), attention_mask=torch.ones(1, len(naive), dtype=torch.long),
                              mm_token_type_ids=torch.tensor([model_inputs.seq["mm_token_type_ids"][cut:]]), **model_inputs.media)

    # 2) the same episode within max_context: turn 1 is dropped whole, with its image
    old = tiny_policy.max_context
    tiny_policy.max_context = max_context
    try:
        conv = fresh()
        replies = play(conv, 4)
    finally:
        tiny_policy.max_context = old
    assert conv.dropped_turns == 1 and conv.turns_present() == [0, 2, 3]
    state: TokenState = conv.state
    assert state.dropped == {1}
    tr = Trajectory(task_id="overflow", turns=[Turn(index=k, observation="") for k in range(4)])
    state.fill_trajectory(tr)
    tr.info["logprob_temperature"] = 1.0
    assert tr.dropped_turns == 1
    ids = tr.token_ids
    assert len(ids) <= max_context
    runs = _image_runs(ids, image_id)
    assert [e - s for s, e in runs] == [64, 64, 64]  # task, zoom 1 (turn 2), zoom 2 (turn 3): all whole
    vocab = tiny_policy.tokenizer.get_vocab()
    for s, e in runs:
        assert ids[s - 1] == vocab["<|vision_start|>"] and ids[e] == vocab["<|vision_end|>"]
    # replies sampled on the dropped context (turn 2) are context now; turns 0 and 3 train
    assert [t.token_span is not None for t in tr.turns] == [True, False, False, True]
    assert replies[:3] == play(fresh(), 3)  # greedy: same replies before the drop
    batch = build_rollout_batch([tr], tiny_policy.pad_token_id)
    with torch.no_grad():
        lp = tiny_policy.logprobs(batch)
    assert torch.allclose(lp[batch.action_mask], batch.old_logprobs[batch.action_mask], atol=1e-4)


def test_budget_exhausted_is_reported_not_raised(tiny_policy, make_image):
    old = tiny_policy.max_context
    tiny_policy.max_context = 40  # smaller than the task prompt alone (64 image tokens)
    try:
        (g,) = tiny_policy.generate([_task(make_image())], SamplingParams(max_new_tokens=4))
    finally:
        tiny_policy.max_context = old
    assert g.finish_reason == "budget" and "max_context=40" in g.error and g.text == ""


def test_rejected_image_is_a_per_conversation_error(tiny_policy, make_image):
    good = _task(make_image())
    thin = _task(np.zeros((1, 600, 3), np.uint8))  # aspect ratio > 200: the processor refuses
    floaty = _task(np.zeros((64, 64, 3), np.float32))
    gens = tiny_policy.generate([thin, good, floaty], SamplingParams(max_new_tokens=4))
    assert [g.finish_reason for g in gens][1] in ("stop", "length")
    assert gens[0].finish_reason == "error" and "rejected turn 0" in gens[0].error
    assert gens[2].finish_reason == "error" and "uint8" in gens[2].error
    again = tiny_policy.generate([thin], SamplingParams(max_new_tokens=4))  # stays failed, never raises
    assert again[0].finish_reason == "error"


def test_missing_model_or_template_is_one_clear_error(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="does-not-exist"):
        HFPolicy(tmp_path / "does-not-exist")
    bare = tmp_path / "no-template"
    shutil.copytree(tiny_model_path(), bare)
    (bare / "chat_template.jinja").unlink()
    with pytest.raises(ModelLoadError, match=r"no-template.*no chat template"):
        HFPolicy(bare)


def test_template_without_tools_gets_them_in_the_system_prompt(make_image):
    path = tiny_model_path()
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(path, local_files_only=True)
    proc.chat_template = QWEN25VL_TEMPLATE
    pol = HFPolicy.from_model(AutoModelForImageTextToText.from_pretrained(path, local_files_only=True), proc, name="stock-template")
    assert not pol.encoder.frame.tools_in_template
    conv = _task(make_image())
    text = pol.render(conv)
    assert text.startswith("<|im_start|>system\n# Tools") and '"name": "zoom"' in text
    trajs = _play(pol, [conv], 2, SamplingParams(max_new_tokens=6, seed=0), make_image)
    decoded = re.sub(r"(<\|image_pad\|>)+", "<|image_pad|>", pol.tokenizer.decode(trajs[0].token_ids))
    assert decoded.startswith(text)
    batch = build_rollout_batch(trajs, pol.pad_token_id)
    with torch.no_grad():
        lp = pol.logprobs(batch)
    assert torch.allclose(lp[batch.action_mask], batch.old_logprobs[batch.action_mask], atol=1e-4)


def test_lora_trains_only_adapters(make_image):
    pol = HFPolicy(lora=LoraSettings(r=4, alpha=8))
    names = [n for n, p in pol.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert not any("visual" in n for n in names)
    trajs = _play(pol, [_task(make_image()) for _ in range(2)], 2, SamplingParams(max_new_tokens=6, seed=0), make_image)
    batch = build_rollout_batch(trajs, pol.pad_token_id)
    lp = pol.logprobs(batch)
    assert torch.allclose(lp[batch.action_mask].detach(), batch.old_logprobs[batch.action_mask], atol=1e-4)
    (-lp.sum()).backward()
    assert all(p.grad is not None for p in pol.parameters())
    sd = pol.export_state_dict()
    base = HFPolicy().model.state_dict()
    assert set(sd) == set(base)
    assert all(torch.equal(sd[k], base[k]) for k in base)  # lora_B starts at zero: merged == base


def test_malformed_histories_are_caller_errors(tiny_policy, make_image):
    with pytest.raises(ValueError, match="no messages"):
        tiny_policy.generate([Conversation()], SamplingParams(max_new_tokens=2))
    conv = _task(make_image())
    conv.add_action("<answer>A</answer>")
    with pytest.raises(ValueError, match="nothing to reply to"):
        tiny_policy.generate([conv], SamplingParams(max_new_tokens=2))
    conv = _task(make_image())
    conv.messages.append(Message("user", "again"))
    with pytest.raises(ValueError, match="alternate"):
        tiny_policy.generate([conv], SamplingParams(max_new_tokens=2))


def test_given_history_and_tool_role_render_like_the_template(tiny_policy, make_image):
    """A history the policy did not sample (e.g. a demonstration) becomes context with
    mask 0, and the token pieces concatenate to the template's own rendering."""
    conv = _task(make_image())
    conv.add_action('<tool_call>{"name": "zoom", "arguments": {"region": 3}}</tool_call>')
    conv.messages.append(Message("tool", "<image>", images=(make_image(112, 112),), turn=1))
    (g,) = tiny_policy.generate([conv], SamplingParams(max_new_tokens=4, seed=0))
    state: TokenState = conv.state
    assert [s.kind for s in state.segments] == ["prompt", "given", "obs", "gen"]
    rendered = tiny_policy.render(conv)  # tool results go in as user turns by default
    assert "<|im_start|>user\n<|vision_start|>" in rendered
    prompt = tiny_policy.tokenizer.decode(state.ids()[: -len(g.token_ids)])
    assert re.sub(r"(<\|image_pad\|>)+", "<|image_pad|>", prompt) == rendered
    tr = Trajectory(task_id="given", turns=[Turn(index=0, observation=""), Turn(index=1, observation="")])
    state.fill_trajectory(tr)
    assert tr.turns[0].token_span is None and tr.turns[1].token_span is not None
    assert sum(tr.action_mask) == len(g.token_ids)
    from mmgym.agents.encoder import EpisodeEncoder

    as_tool = EpisodeEncoder(tiny_policy.processor, tiny_policy.model.config, tool_result_role="tool")
    assert "<|im_start|>user\n<tool_response>\n<|vision_start|>" in as_tool.render(conv)
    fresh = Conversation(tools=conv.tools, messages=list(conv.messages[:3]))
    st = as_tool.sync(fresh)
    assert as_tool.tokenizer.decode(st.ids()).count("<tool_response>") == 1


def test_added_action_tokens_are_single_trainable_tokens_and_survive_a_reload(tmp_path: Path, make_image):
    from mmgym.envs.registration import env_policy_tokens
    from mmgym.envs.vla import ActionTokenizer

    tokens = env_policy_tokens("mmgym/PushBlock-v0")
    assert tokens == tuple(ActionTokenizer().vocab) and env_policy_tokens("mmgym/PushBlock-Continuous-v0") == ()
    assert env_policy_tokens("mmgym/PushBlock-v0", {"n_bins": 16}) == tuple(f"<act_{k}>" for k in range(16))
    stock = HFPolicy()
    reply = "<action>" + ActionTokenizer().encode(np.zeros((8, 7))) + "</action>"
    assert len(stock.tokenizer(reply)["input_ids"]) > 300  # the stock tokenizer spells each bin out
    torch.manual_seed(0)
    pol = HFPolicy(add_tokens=tokens)
    assert pol.added_tokens == 256
    rows = pol.model.get_input_embeddings().weight.shape[0]
    assert rows >= len(pol.tokenizer) and rows % 64 == 0 and pol.encoder.vocab_size == rows
    ids = pol.tokenizer(reply)["input_ids"]
    assert len(ids) < 70 and pol.tokenizer.decode(ids) == reply
    assert all(len(pol.tokenizer(t, add_special_tokens=False)["input_ids"]) == 1 for t in tokens)
    # the grown model samples (the new rows included in its distribution)
    gen = pol.generate([_task(make_image(64, 64))], SamplingParams(max_new_tokens=8, temperature=1.0, seed=0))[0]
    assert gen.token_ids and all(0 <= i < rows for i in gen.token_ids) and all(np.isfinite(gen.logprobs))
    pol.model.save_pretrained(tmp_path)
    pol.processor.save_pretrained(tmp_path)
    again = HFPolicy(tmp_path, add_tokens=tokens)
    assert again.added_tokens == 0 and again.model.get_input_embeddings().weight.shape[0] == rows
    assert again.tokenizer(reply)["input_ids"] == ids
    with pytest.raises(ValueError, match="non-empty strings"):
        HFPolicy(add_tokens=[" <pad_me> "])
