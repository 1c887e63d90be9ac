"""The multi-task loss and the batches it reads: each term only where its labels exist, weights from
the config, caption padding masked with -100, and gradients reaching both encoders."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mmqa.data.batch import Collator
from mmqa.data.records import ImageRecord


def test_batch_holds_each_image_once_with_all_its_labels(tiny_parts):
    cfg, dm, model, lit, batch = tiny_parts()
    records = dm.records["train"][:8]
    assert batch.images.shape == (8, 3, 32, 32)
    assert batch.num_questions == sum(len(r.questions) for r in records)
    # every question points at its own image row
    expected = [row for row, r in enumerate(records) for _ in r.questions]
    assert batch.q_img_idx.tolist() == expected
    assert batch.refs == [r.captions for r in records]
    # soft targets: the one annotator's answer scores 1
    assert torch.equal(batch.vqa_targets.sum(-1), torch.ones(batch.num_questions))


def test_caption_labels_mask_padding_by_position_not_token_id(tiny_parts):
    cfg, dm, model, lit, batch = tiny_parts()
    pad = dm.tokenizers[1].pad_token_id
    padded = batch.c_dec_attention_mask == 0
    assert padded.any(), "captions of different lengths must pad"
    assert (batch.c_dec_labels[padded] == -100).all()
    assert torch.equal(batch.c_dec_labels[~padded], batch.c_dec_input_ids[~padded])
    assert (batch.c_dec_input_ids[padded] == pad).all()


def test_gpt2_style_tokenizer_with_pad_equal_to_eos_keeps_the_eos_label(tiny_parts):
    cfg, dm, model, lit, batch = tiny_parts()
    text_tok, tok = dm.tokenizers  # the real GPT-2 tokenizer has pad == eos: emulate it
    old = tok.pad_token
    tok.pad_token = tok.eos_token
    try:
        collate = Collator(text_tok, tok, dm.answers, 32, 40, 2, train=False)
        rec = ImageRecord(image=dm.records["train"][0].image, id="x", captions=["a red circle", "a b"])
        b = collate([(0, torch.zeros(3, 32, 32), rec)])
        last_real = b.c_dec_attention_mask.sum(1) - 1  # position of each caption's [EOS]
        eos_labels = b.c_dec_labels[torch.arange(2), last_real]
        assert (eos_labels == tok.eos_token_id).all()  # eos stays a target although it equals pad
        assert (b.c_dec_labels[b.c_dec_attention_mask == 0] == -100).all()
    finally:
        tok.pad_token = old


def test_each_loss_only_where_its_labels_exist(tiny_parts):
    cfg, dm, model, lit, batch = tiny_parts()
    losses, _ = lit.compute_losses(batch)
    assert set(losses) == {"vqa", "caption", "contrastive", "concepts"}
    no_captions = dataclasses.replace(
        batch,
        c_img_idx=batch.c_img_idx[:0],
        c_input_ids=batch.c_input_ids[:0],
        c_attention_mask=batch.c_attention_mask[:0],
        c_dec_input_ids=batch.c_dec_input_ids[:0],
        c_dec_attention_mask=batch.c_dec_attention_mask[:0],
        c_dec_labels=batch.c_dec_labels[:0],
        clip_caption=torch.full_like(batch.clip_caption, -1),
        has_concepts=torch.zeros_like(batch.has_concepts),
    )
    losses, _ = lit.compute_losses(no_captions)
    assert set(losses) == {"vqa"}
    no_questions = dataclasses.replace(batch, q_img_idx=batch.q_img_idx[:0])
    losses, _ = lit.compute_losses(no_questions)
    assert set(losses) == {"caption", "contrastive", "concepts"}


def test_weights_switch_terms_off_and_scale_them(tiny_parts):
    cfg, dm, model, lit, batch = tiny_parts("loss.caption=0", "loss.contrastive=2.0", "loss.concepts=0.5")
    lit.train()
    losses, _ = lit.compute_losses(batch)
    assert "caption" not in losses  # switched off: not even computed
    total = lit.total_loss(losses)
    assert torch.allclose(total, losses["vqa"] + 2.0 * losses["contrastive"] + 0.5 * losses["concepts"])


def test_unknown_loss_term_is_refused(tiny_parts):
    from mmqa.lit_module import LitMMQA

    cfg, dm, model, lit, batch = tiny_parts()
    with pytest.raises(ValueError, match=r"unknown loss term\(s\) \['vqq'\].*valid: \['vqa', 'caption', 'contrastive', 'concepts', 'ingredients', 'recipe'\]"):
        LitMMQA(model, lit.answers, [], lit.dec_tok, {"vqq": 1.0}, None, None, cfg.generation, 8)


def test_gradients_reach_both_encoders_from_the_vqa_loss_alone(tiny_parts):
    cfg, dm, model, lit, batch = tiny_parts("loss.caption=0", "loss.contrastive=0", "loss.concepts=0")
    lit.train()
    losses, _ = lit.compute_losses(batch)
    lit.total_loss(losses).backward()
    img_grad = sum(p.grad.abs().sum() for p in model.image_encoder.parameters() if p.grad is not None)
    txt_grad = sum(p.grad.abs().sum() for p in model.text_encoder.parameters() if p.grad is not None)
    dec_grads = [p.grad for p in model.decoder.parameters() if p.grad is not None]
    assert img_grad > 0 and txt_grad > 0
    assert dec_grads == []  # the decoder is not part of the VQA path


def test_vqa_loss_is_soft_score_bce(tiny_parts):
    cfg, dm, model, lit, batch = tiny_parts()
    losses, out = lit.compute_losses(batch)
    logits = out["vqa_logits"]
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.vqa_targets, reduction="sum")
    assert torch.allclose(losses["vqa"], expected / len(logits))


def test_family_weights_scale_each_questions_vqa_loss(tiny_parts):
    cfg, dm, model, lit, batch = tiny_parts("+data.vqa_family_weight.spatial=3.0", "+data.vqa_family_weight.counting=0.0")
    assert {"spatial", "counting"} <= set(batch.q_families) and len(set(batch.q_families)) > 2
    losses, out = lit.compute_losses(batch)
    per_row = torch.nn.functional.binary_cross_entropy_with_logits(out["vqa_logits"], batch.vqa_targets,
                                                                     reduction="none").sum(-1)  # (Q,)
    factor = torch.tensor([{"spatial": 3.0, "counting": 0.0}.get(f, 1.0) for f in batch.q_families])
    assert torch.allclose(losses["vqa"], (per_row * factor).sum() / len(per_row))
    assert not torch.allclose(losses["vqa"], per_row.mean())
    with pytest.raises(Exception, match=r"data.vqa_family_weight: \['spatail'\] is not a question family of this data; "
                                        r"its families: attribute, comparison, counting, existence, spatial"):
        tiny_parts("+data.vqa_family_weight.spatail=2.0")


def test_a_nan_loss_stops_training_and_names_the_term(tiny_parts, monkeypatch):
    from mmqa.lit_module import NonFiniteLossError

    cfg, dm, model, lit, batch = tiny_parts()
    lit.train()
    head = model.vqa_head.forward
    monkeypatch.setattr(model.vqa_head, "forward", lambda pooled: head(pooled) * float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 0 \(batch 3\): vqa=nan; lower optim.lr"):
        lit.training_step(batch, 3)


def test_a_batch_without_labels_for_any_enabled_loss_is_a_clear_error(tiny_parts):
    from mmqa.errors import MMQAError

    cfg, dm, model, lit, batch = tiny_parts("loss.vqa=0", "loss.caption=0", "loss.contrastive=0", "loss.concepts=0", "loss.recipe=1")
    lit.train()
    with pytest.raises(MMQAError, match=r"batch 3 has no labels for any enabled loss \(ingredients, recipe\): this data has none of them; enable a loss"):
        lit.training_step(batch, 3)


def test_warmup_stable_decay_holds_the_peak_then_decays_to_zero():
    from mmqa.lit_module import warmup_stable_decay

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_stable_decay(opt, num_training_steps=100, warmup_fraction=0.1, decay_fraction=0.2)
    rates = []
    for _ in range(100):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[0] == 0.0 and rates[5] == pytest.approx(1.0)  # linear warmup over 10 steps
    assert rates[10:81] == [pytest.approx(2.0)] * 71  # the peak held until the last 20 steps
    assert rates[90] == pytest.approx(1.0) and rates[99] < 0.02  # cosine decay, half-way at 90, to 0
