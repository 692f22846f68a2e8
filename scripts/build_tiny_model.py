#!/usr/bin/env python
"""Build mmgym's embedded default model: a tiny, untrained Qwen2.5-VL.

Writes ``mmgym/assets/tiny_qwen2_5_vl/`` (or ``--out``): config, randomly initialised
weights (fixed seed), a byte-level BPE tokenizer trained here with the ``tokenizers``
library on mmgym's own task vocabulary, the stock Qwen2.5-VL image/video processors
and a chat template with tool support. Everything loads with ``from_pretrained(path)``
and no hub access::

    python scripts/build_tiny_model.py            # rebuild the shipped copy
    python scripts/build_tiny_model.py --out /tmp/tiny --check   # build and compare

The build is reproducible: the same repository state gives byte-identical files.
The tokenizer corpus is a fixed word list (prompts, tool-call JSON, answer tags,
colours, shapes, options, numbers) plus the first observations and tool schemas of
every registered ``mmgym/...`` env that can be built without data files, drawn with
fixed seeds (``--no-envs`` leaves them out).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger("build_tiny_model")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "mmgym" / "assets" / "tiny_qwen2_5_vl"
SEED = 0
VOCAB_SIZE = 2048  # target BPE vocabulary (special tokens included)

# Qwen2.5-VL's special tokens, in Qwen's order; the model config points at these ids.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Added but not special (kept by decode(skip_special_tokens=True)): one token per tag,
# so a tiny model can finish a tool call or an answer in a few steps.
TAG_TOKENS = [
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<answer>",
    "</answer>",
    "<think>",
    "</think>",
]

# Qwen2.5-VL's multimodal message rendering plus Qwen2.5's (Hermes) tool prompt; tool
# results are wrapped in <tool_response> inside a user turn, as Qwen2.5 does.
CHAT_TEMPLATE = r"""{%- macro render_content(content) -%}
{%- if content is string -%}{{ content }}
{%- else -%}{%- for part in content -%}
{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}<|vision_start|><|image_pad|><|vision_end|>
{%- elif part['type'] == 'video' or 'video' in part -%}<|vision_start|><|video_pad|><|vision_end|>
{%- elif 'text' in part -%}{{ part['text'] }}
{%- endif -%}{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{%- if messages[0]['role'] == 'system' -%}
{%- set system_text = render_content(messages[0]['content']) -%}{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set system_text = 'You are a helpful assistant.' -%}{%- set loop_messages = messages -%}
{%- endif -%}
{{- '<|im_start|>system\n' + system_text -}}
{%- if tools -%}
{{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
{%- for tool in tools -%}{{- '\n' -}}{{- tool | tojson -}}{%- endfor -%}
{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- for message in loop_messages -%}
{%- if message['role'] == 'tool' -%}
{{- '<|im_start|>user\n<tool_response>\n' + render_content(message['content']) + '\n</tool_response><|im_end|>\n' -}}
{%- else -%}
{{- '<|im_start|>' + message['role'] + '\n' + render_content(message['content']) + '<|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"""

# Qwen2.5-VL architecture at ~1 M parameters (REFERENCES: text 128-d x 4 layers, vision
# 64-d x 2 blocks; patch 14, spatial merge 2). mrope_section sums to head_dim / 2.
TEXT_CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
    use_sliding_window=False,
    tie_word_embeddings=True,
)
VISION_CONFIG = dict(
    depth=2,
    hidden_size=64,
    intermediate_size=128,
    num_heads=4,
    in_channels=3,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    tokens_per_second=2,
    window_size=112,
    fullatt_block_indexes=[1],
    out_hidden_size=128,
)
# A 224x224 image -> 16x16 patches -> 8x8 = 64 image tokens; larger images are shrunk.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 224 * 224

COLOURS = "red green blue yellow orange purple pink brown black white gray grey cyan magenta violet gold silver".split()
SHAPES = "circle square triangle star cross diamond hexagon pentagon rectangle ellipse heart arrow ring line dot".split()
RELATIONS = "left right top bottom above below center centre middle upper lower inside outside near far next behind front".split()
OBJECTS = (
    "object target image picture view region cell grid box frame video clip second seconds time "
    "start end question option options answer tool call result error zoom crop seek move pick place "
    "ask consult specialist doctor patient scan organ lesion chest brain abdomen lung liver kidney heart "
    "arm gripper cube ball table robot goal step turn score reward task first last small large big tiny "
    "colour color shape size number count how many what which where when is are the of a an in on at to "
    "and or not yes no one two three four five six seven eight nine ten"
).split()
SENTENCES = [
    "You are a helpful assistant.",
    "You are a visual agent. Look at the image and answer the question.",
    "Call a tool with <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call> or reply with <answer>...</answer>.",
    "The image is divided into a grid of regions numbered row by row.",
    "Zoom into a region to see it at a higher resolution.",
    "What is the colour of the framed square? Answer with one word.",
    "Which option is correct? Answer with the letter of the option.",
    "Here is the zoomed region.",
    "Invalid tool call: the arguments do not match the schema.",
    "No <tool_call> or <answer> found. Reply with a tool call or an answer.",
    "unbalanced tags: every <tool_call>, <answer> and <think> must be closed exactly once",
    "tool call is not valid JSON",
    "unknown tool",
    "The original image is 224 x 224 pixels.",
]


def fixed_corpus() -> list[str]:
    """The built-in part of the tokenizer corpus (no env needed)."""
    lines: list[str] = list(SENTENCES)
    words = COLOURS + SHAPES + RELATIONS + OBJECTS
    for w in words:
        lines += [w, " " + w, w.capitalize(), f"<answer>{w}</answer>", f"The {w} one.", f"a {w} {w}"]
    for c in COLOURS:
        for s in SHAPES:
            lines.append(f"the {c} {s} is on the left of the {s}.")
    for letter in "ABCDEFGH":
        lines += [f"({letter})", f"{letter}.", f"<answer>{letter}</answer>", f"Option {letter}: "]
    for n in range(0, 1001, 7):
        lines += [str(n), f"{n}.{n % 10}", f"<answer>{n}</answer>"]
    for k in range(1, 65):
        lines.append(f'<tool_call>{{"name": "zoom", "arguments": {{"region": {k}}}}}</tool_call>')
    for box in ([0, 0, 112, 112], [56, 28, 168, 140], [100, 120, 180, 200]):
        lines.append(f'<tool_call>{{"name": "zoom", "arguments": {{"bbox": {box}}}}}</tool_call>')
    lines.append('<tool_call>{"name": "seek", "arguments": {"start": 3.5, "end": 10.0}}</tool_call>')
    lines.append("<think>I should zoom in first.</think>")
    return lines


_PROBE_ACTIONS = (
    "<answer>A</answer>",
    "no tags",
    '<tool_call>{"name": "zoom", "arguments": {"bbox": [10, 20, 200, 180]}}</tool_call>',
    '<tool_call>{"name": "zoom", "arguments": {"region": 5}}</tool_call>',
    '<tool_call>{"name": "zoom"}</tool_call>',
)


def env_corpus(seeds: int = 16) -> list[str]:
    """Texts of every registered mmgym env that builds offline without an extra: first
    observations, system prompts, tool schemas and the env's replies to probe actions."""
    try:
        import gymnasium

        import mmgym  # noqa: F401  (registers env ids)
    except Exception as e:  # pragma: no cover - the envs are optional for the build
        logger.warning("mmgym envs not importable (%s); corpus uses the fixed word list only", e)
        return []
    from mmgym.envs.registration import NEEDS_EXTRA

    lines: list[str] = []
    # robotics sims behind an extra are slow to build and hold no task text worth learning
    ids = sorted(k for k in gymnasium.registry if k.startswith("mmgym/") and k not in NEEDS_EXTRA)
    for env_id in ids:
        try:
            env = gymnasium.make(env_id)
        except Exception as e:  # an env that needs data files or an extra
            logger.info("skipping %s for the corpus: %s", env_id, e)
            continue
        try:
            for seed in range(seeds):
                obs, info = env.reset(seed=seed)
                lines.append(str(obs.get("text", "")))
                if info.get("system_prompt"):
                    lines.append(str(info["system_prompt"]))
                for schema in info.get("tool_schemas", []) or []:
                    lines.append(json.dumps(schema, ensure_ascii=False))
                for action in _PROBE_ACTIONS:
                    env.reset(seed=seed)
                    obs2, *_ = env.step(action)
                    lines.append(str(obs2.get("text", "")))
        except Exception as e:  # pragma: no cover
            logger.warning("env %s failed while drawing corpus text: %s", env_id, e)
        finally:
            env.close()
    return lines


def train_tokenizer(corpus: list[str], vocab_size: int):
    """Byte-level BPE with Qwen2's pre-tokenizer, normaliser and decoder."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    pattern = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS) - len(TAG_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    return tok


def build(out: Path, *, use_envs: bool = True) -> None:
    """Write the tiny model to ``out`` (created; existing files overwritten)."""
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2Tokenizer,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    out.mkdir(parents=True, exist_ok=True)
    corpus = fixed_corpus() + (env_corpus() if use_envs else [])
    # the rendered chat frame itself (system prompt, tool prompt, role headers)
    corpus += [CHAT_TEMPLATE.replace("{{", " ").replace("}}", " ")] * 4
    raw = train_tokenizer(corpus, VOCAB_SIZE)
    with tempfile.TemporaryDirectory() as tmp:
        raw.save(os.path.join(tmp, "tokenizer.json"))
        tokenizer = Qwen2Tokenizer(
            tokenizer_file=os.path.join(tmp, "tokenizer.json"),
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            unk_token=None,
            model_max_length=TEXT_CONFIG["max_position_embeddings"],
            clean_up_tokenization_spaces=False,
            split_special_tokens=False,
        )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS + TAG_TOKENS}
    vocab = len(tokenizer)
    vocab_padded = (vocab + 63) // 64 * 64

    image_processor = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    video_processor = Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, cap_pixels_per_frame=True)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )

    config = Qwen2_5_VLConfig(
        text_config=dict(
            TEXT_CONFIG,
            vocab_size=vocab_padded,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=VISION_CONFIG,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(SEED)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
    )
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    n_vision = sum(p.numel() for p in model.model.visual.parameters())
    (out / "README.md").write_text(
        "# mmgym's embedded tiny Qwen2.5-VL (untrained)\n\n"
        "Built by `python scripts/build_tiny_model.py` (reproducible: the same repository state gives "
        "the same bytes; `--out DIR --check` compares a fresh build with this copy).\n\n"
        f"- architecture: `Qwen2_5_VLForConditionalGeneration`, {n_params:,} parameters "
        f"({n_vision:,} in the vision tower), random init with seed {SEED}\n"
        f"- text: {TEXT_CONFIG['hidden_size']}-d x {TEXT_CONFIG['num_hidden_layers']} layers; vision: "
        f"{VISION_CONFIG['hidden_size']}-d x {VISION_CONFIG['depth']} blocks, patch {VISION_CONFIG['patch_size']}, "
        f"merge {VISION_CONFIG['spatial_merge_size']}; a 224x224 image is 64 image tokens\n"
        f"- tokenizer: byte-level BPE trained with `tokenizers` on mmgym's task text, {vocab} tokens "
        "(Qwen2.5-VL's special tokens included; tags like `<tool_call>` and `<answer>` are single tokens)\n"
        "- processor: stock `Qwen2_5_VLProcessor`; chat template: Qwen2.5-VL's with Qwen2.5's tool prompt\n\n"
        "Load with `AutoModelForImageTextToText.from_pretrained(path)` / `AutoProcessor.from_pretrained(path)`, "
        "or `mmgym.agents.HFPolicy()`.\n",
        encoding="utf-8",
    )
    for f in out.iterdir():  # safetensors writes 0600; the package data must be world-readable
        f.chmod(0o644)
    size = (out / "model.safetensors").stat().st_size
    logger.info("wrote %s: %d parameters, %.2f MB weights, vocab %d (padded %d)", out, n_params, size / 1e6, vocab, vocab_padded)


def _digest(path: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16]
        for p in sorted(path.iterdir())
        if p.is_file()
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: the shipped copy)")
    ap.add_argument("--no-envs", action="store_true", help="build the tokenizer from the fixed word list only")
    ap.add_argument("--check", action="store_true", help="compare --out with the shipped copy file by file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build(args.out, use_envs=not args.no_envs)
    if args.check and args.out.resolve() != DEFAULT_OUT.resolve():
        a, b = _digest(args.out), _digest(DEFAULT_OUT)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            logger.error("differs from the shipped model: %s", ", ".join(diff))
            return 1
        logger.info("identical to the shipped model (%d files)", len(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
