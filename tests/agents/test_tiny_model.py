"""The embedded tiny Qwen2.5-VL: stock classes, small, offline, reproducible."""

from __future__ import annotations

import filecmp
import importlib.util
import json
from pathlib import Path

import numpy as np

from mmgym.agents import tiny_model_path

REPO = Path(__file__).resolve().parents[2]


def test_loads_offline_with_stock_auto_classes():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_model_path()
    proc = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    assert type(proc).__name__ == "Qwen2_5_VLProcessor"
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    n_vision = sum(p.numel() for p in model.model.visual.parameters())
    n_total = sum(p.numel() for p in model.parameters())
    assert 0 < n_vision < n_total <= 3_000_000  # a few million at most, vision tower included
    assert (path / "model.safetensors").stat().st_size < 8_000_000
    assert proc.chat_template and "tools" in proc.chat_template


def test_a_224_image_gives_64_image_tokens():
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_model_path(), local_files_only=True)
    for h, w in ((224, 224), (448, 448), (1000, 1200)):
        out = proc(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[np.zeros((h, w, 3), np.uint8)], return_tensors="pt")
        n = int((out["input_ids"] == proc.image_token_id).sum())
        assert n <= 64 and (n == 64 or (h, w) != (224, 224))


def test_tokenizer_is_trained_on_task_words():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path(), local_files_only=True)
    vocab = tok.get_vocab()
    for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
              "<|video_pad|>", "<tool_call>", "</tool_call>", "<answer>", "</answer>"):
        assert t in vocab, t
        assert tok.encode(t, add_special_tokens=False) == [vocab[t]]
    assert len(tok.encode("<answer>B</answer>", add_special_tokens=False)) == 3
    for word in (" red", " blue", " square", " triangle", " zoom", " left"):
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word
    call = '<tool_call>{"name": "zoom", "arguments": {"bbox": [10, 20, 200, 180]}}</tool_call>'
    ids = tok.encode(call, add_special_tokens=False)
    assert len(ids) < 40 and tok.decode(ids) == call  # byte-level: lossless round trip
    assert tok.decode(tok.encode("héllo ✓ 日本", add_special_tokens=False)) == "héllo ✓ 日本"


def test_build_script_is_reproducible(tmp_path: Path):
    spec = importlib.util.spec_from_file_location("build_tiny_model", REPO / "scripts" / "build_tiny_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a, b = tmp_path / "a", tmp_path / "b"
    mod.build(a, use_envs=False)
    mod.build(b, use_envs=False)
    names = sorted(p.name for p in a.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "processor_config.json"} <= set(names)
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors
    # the shipped copy has the architecture the script builds (its vocabulary also holds env words)
    built = json.loads((a / "config.json").read_text())
    shipped = json.loads((tiny_model_path() / "config.json").read_text())
    assert built["vision_config"] == shipped["vision_config"]
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        assert built["text_config"][k] == shipped["text_config"][k]
    assert (tiny_model_path() / "chat_template.jinja").read_text() == (a / "chat_template.jinja").read_text()
