"""The concept loss: which caption words an image shows, learnt from its best patch. The words, the
vocabulary, the targets of a batch, the loss value, where its gradient goes, and that the head stays
out of the exported model."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from mmqa.data.batch import Collator
from mmqa.data.concepts import caption_words
from mmqa.data.records import ImageRecord


def test_caption_words_are_lower_cased_content_words():
    words = caption_words(["A large Red circle, and 2 cats on the mat.", "There is a red circle"])
    assert words == {"large", "red", "circle", "2", "cats", "mat"}


def test_concept_vocab_keeps_the_words_most_images_use(tiny_parts):
    cfg, dm, model, lit, batch = tiny_parts()
    image = dm.records["train"][0].image
    dm.records = {
        "train": [
            ImageRecord(image=image, id="1", captions=["a red circle", "a red red circle", "the red square"]),
            ImageRecord(image=image, id="2", captions=["a blue circle"]),
            ImageRecord(image=image, id="3", captions=["a blue cross"]),
            ImageRecord(image=image, id="4"),  # no captions: no words
        ]
    }
    dm.concept_top_k = 3
    # images per word: circle 2, blue 2, red 1 (once, however often one image says it), cross 1, square 1
    assert dm.concept_vocab() == ["blue", "circle", "cross"]  # a tie at 1 goes to the alphabetically first
    dm.concept_top_k = 0
    assert dm.concept_vocab() == []


def test_batch_targets_hold_the_words_of_all_captions_of_each_image(tiny_parts):
    cfg, dm, model, lit, batch = tiny_parts()
    text_tok, dec_tok = dm.tokenizers
    collate = Collator(text_tok, dec_tok, dm.answers, 32, 40, 1, train=True, concepts=["circle", "red", "square"])
    image = dm.records["train"][0].image
    with_captions = ImageRecord(image=image, id="a", captions=["a red circle", "one more circle"])
    without = ImageRecord(image=image, id="b")
    b = collate([(0, torch.zeros(3, 32, 32), with_captions), (1, torch.zeros(3, 32, 32), without)])
    assert b.num_captions == 1  # the LM sees one caption per step ...
    assert b.concept_targets.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]  # ... the targets use both
    assert b.has_concepts.tolist() == [True, False]


def test_concept_loss_is_bce_of_each_words_best_patch(tiny_parts):
    cfg, dm, model, lit, batch = tiny_parts()
    assert dm.concepts == dm.concept_vocab() and {"circle", "square"} <= set(dm.concepts)
    assert batch.concept_targets.shape == (len(batch.images), len(dm.concepts))
    lit.eval()
    losses, out = lit.compute_losses(batch)
    tokens = out["img"].tokens  # (B, N, D)
    logits = lit.concept_head.net(tokens).amax(1)  # (B, V): each word from its best patch
    expected = F.binary_cross_entropy_with_logits(logits, batch.concept_targets, reduction="sum") / len(logits)
    assert torch.allclose(losses["concepts"], expected)


def test_concept_gradient_reaches_the_image_encoder_only(tiny_parts):
    cfg, dm, model, lit, batch = tiny_parts()
    lit.train()
    losses, _ = lit.compute_losses(batch)
    losses["concepts"].backward()
    grad = lambda module: sum(p.grad.abs().sum().item() for p in module.parameters() if p.grad is not None)
    assert grad(model.image_encoder) > 0 and grad(lit.concept_head) > 0
    assert grad(model.text_encoder) == 0 and grad(model.decoder) == 0 and grad(model.fusion) == 0


def test_concept_head_is_trained_but_not_exported(tiny_parts):
    cfg, dm, model, lit, batch = tiny_parts()
    assert not any("concept" in k for k in model.state_dict())  # the bundle saves `lit.model`
    lit._trainer = types.SimpleNamespace(estimated_stepping_batches=10)  # what configure_optimizers reads
    optimised = {id(p) for g in lit.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    assert all(id(p) in optimised for p in lit.concept_head.parameters())


@pytest.mark.parametrize("override", ["loss.concepts=0", "data.concept_top_k=0"])
def test_no_concept_head_when_the_loss_is_off_or_the_vocabulary_empty(tiny_parts, override):
    cfg, dm, model, lit, batch = tiny_parts(override)
    losses, _ = lit.compute_losses(batch)
    assert lit.concept_head is None and "concepts" not in losses
