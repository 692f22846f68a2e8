"""``sft.mask_tool_arguments``: the warm start's loss skips tool-call argument values only."""

from __future__ import annotations

import json
from pathlib import Path

from mmgym.trainer.loop import Trainer
from mmgym.trainer.run_dir import RunDir


def _demos(tiny_config, root: Path, name: str, *overrides: str):
    """The oracle demonstrations of a run ``name`` (``overrides`` win), after one SFT pass on them."""
    cfg = tiny_config(root, "sft.enabled=true", "sft.demonstrations=4", "sft.steps=1", "sft.batch_size=2",
                      *overrides, f"run_name={name}")
    run = RunDir.create(root / name, cfg)
    try:
        tr = Trainer(cfg, run, progress=False)
        demos = tr.collect_demonstrations()
        tr.collect_demonstrations = lambda: demos  # sft() trains on these very episodes
        tr.sft()
        return tr, demos, run
    finally:
        run.close()


def test_argument_tokens_leave_the_loss_and_nothing_else_does(tiny_config, tmp_path: Path) -> None:
    tr, plain, _ = _demos(tiny_config, tmp_path, "m0", "sft.mask_tool_arguments=false")
    _, masked, run = _demos(tiny_config, tmp_path, "m1", "sft.mask_tool_arguments=true")
    decode = tr.policy.tokenizer.decode
    assert len(plain) == len(masked) == 4
    for a, b in zip(plain, masked):
        assert a.token_ids == b.token_ids  # the same oracle episodes
        dropped = [j for j, (x, y) in enumerate(zip(a.action_mask, b.action_mask)) if x != y]
        assert all(a.action_mask[j] == 1 and b.action_mask[j] == 0 for j in dropped)
        # exactly the zoom's region number (one or two digits) left the loss
        assert decode([a.token_ids[j] for j in dropped]).strip() == str(a.turns[0].tool_calls[0].arguments["region"])
        assert sum(b.action_mask) == sum(a.action_mask) - len(dropped) > 0
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    counts = [r for r in rows if "masked_argument_tokens" in r]
    assert counts and counts[0]["masked_argument_tokens"] >= 4 and counts[0]["unmasked_replies"] == 0


def test_guessed_answers_leave_the_loss(tiny_config, tmp_path: Path) -> None:
    """With ``zoom_noise=1`` every zoom is random; ``mask_guesses`` drops exactly the answer
    turns of the episodes whose zoom missed (the guesses) and keeps the calls and the
    answers read from a zoom that showed the target."""
    common = ("sft.demonstrations=24", "sft.steps=0", "sft.zoom_noise=1.0")
    _, plain, _ = _demos(tiny_config, tmp_path, "g0", *common, "sft.mask_guesses=false")
    _, masked, run = _demos(tiny_config, tmp_path, "g1", *common, "sft.mask_guesses=true")
    missed = [float(t.info["metrics"]["zoom_hit"]) == 0.0 for t in plain]
    assert any(missed) and not all(missed)  # 24 random zooms on a grid: both kinds occur
    for a, b, miss in zip(plain, masked, missed):
        assert a.token_ids == b.token_ids
        lo, hi = a.turns[-1].token_span
        first_lo, first_hi = a.turns[0].token_span
        assert b.action_mask[first_lo:first_hi] == a.action_mask[first_lo:first_hi]  # the zoom call stays in
        if miss:
            assert sum(b.action_mask[lo:hi]) == 0 and sum(a.action_mask[lo:hi]) > 0
        else:
            assert b.action_mask == a.action_mask
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["masked_guesses"] for r in rows if "masked_guesses" in r] == [float(sum(missed))]


def test_observation_loss_trains_the_context_text_and_masks_the_rest(tiny_config, tmp_path: Path) -> None:
    """``sft.observation_loss``: the context mask holds exactly the real, non-generated,
    non-vision tokens after the first; SFT steps with it lower the loss on that text and
    log it, and a bad weight is refused."""
    import pytest
    import torch

    from mmgym.trainer.loop import context_mask

    tr, demos, _ = _demos(tiny_config, tmp_path, "o0", "sft.steps=0", "sft.demonstrations=6", "sft.batch_size=6")
    batch = tr.policy.build_batch(demos)
    ctx = context_mask(batch, tr.policy.suppress_token_ids)
    vision = torch.isin(batch.input_ids, torch.tensor(tr.policy.suppress_token_ids))
    assert vision.any()  # the first view's image tokens are in every row
    assert not (ctx & batch.action_mask).any() and not (ctx & vision).any() and not ctx[:, 0].any()
    assert not (ctx & ~batch.attention_mask).any()
    expect = batch.attention_mask & ~batch.action_mask & ~vision
    expect[:, 0] = False
    assert torch.equal(ctx, expect) and ctx.sum() > batch.action_mask.sum() > 0

    def context_nll() -> float:
        import dataclasses

        with torch.no_grad():
            lp = tr.policy.logprobs(dataclasses.replace(batch, action_mask=batch.action_mask | ctx))
        assert torch.isfinite(lp).all()
        return float(-(lp * ctx).sum() / ctx.sum())

    before = context_nll()
    tr2, _, run = _demos(tiny_config, tmp_path, "o1", "sft.steps=8", "sft.demonstrations=6", "sft.batch_size=6",
                         "sft.observation_loss=1.0", "sft.lr=3e-3")
    tr.policy.model.load_state_dict(tr2.policy.model.state_dict())
    assert context_nll() < before - 0.5  # the context text itself was trained
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert any("context_loss" in r for r in rows if r.get("phase") == "sft")
    with pytest.raises(ValueError, match="observation_loss"):
        tiny_config(tmp_path, "sft.observation_loss=-1")
