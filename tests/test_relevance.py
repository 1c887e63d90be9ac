"""Gradient-weighted relevance (mmqa/inspect/relevance.py, Chefer et al. 2021): the propagation rules on
hand-made layer maps, the weight gradients against finite differences of every captured attention,
and a relevance pass that leaves the model's outputs and gradients as they were."""

from __future__ import annotations

import copy

import pytest
import torch
from test_demo import session_bundle, shapes_test_images

from mmqa.inspect.capture import intercept_attention
from mmqa.inspect.relevance import answer_relevance, normalised, propagate, weight_gradients

QUESTION = "what colour is the circle?"
A = torch.tensor([[0.2, 0.6], [0.4, 0.1]])  # a cross-attention map (2 words x 2 patches)


@pytest.fixture(scope="module")
def bundle(data_dir):
    return session_bundle(data_dir)


def test_normalised_keeps_the_identity_and_makes_the_rest_rows_of_one():
    r = torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=torch.float64)
    assert normalised(r).tolist() == [[1.0, 1.0], [0.0, 1.0]]
    assert torch.equal(normalised(torch.eye(3, dtype=torch.float64)), torch.eye(3, dtype=torch.float64))


def test_propagate_follows_the_rules_on_hand_made_maps():
    a, b, c, d = A.flatten().tolist()
    # one cross layer alone: the words' mean of its map
    assert propagate([("fusion/text_blocks.0/cross", A)], 2, 1).tolist() == pytest.approx([(a + c) / 2, (b + d) / 2])
    # a ViT layer first, in which patch 0 reads patch 1 (token 0 is CLS): R̄ of the patches is [[1, 1], [0, 1]]
    vit = torch.zeros(3, 3)
    vit[1, 2] = 0.5
    layers = [("image/blocks.0/self", vit), ("fusion/text_blocks.0/cross", A)]
    assert propagate(layers, 2, 1).tolist() == pytest.approx([(a + c) / 2, (a + b + c + d) / 2])
    # a question self-attention first, in which word 0 reads word 1: R̄ᵀ of the words is [[1, 0], [1, 1]]
    words = torch.tensor([[0.0, 0.3], [0.0, 0.0]])
    layers = [("fusion/text_blocks.0/self", words), ("fusion/text_blocks.0/cross", A)]
    assert propagate(layers, 2, 1).tolist() == pytest.approx([(2 * a + c) / 2, (2 * b + d) / 2])
    # early fusion: the fusion token's row of I + Ā over [token, 2 patches, 1 word]
    joint = torch.zeros(4, 4)
    joint[0, 1], joint[0, 2] = 0.7, 0.2
    assert propagate([("fusion/blocks.0/self", joint)], 2, 1).tolist() == pytest.approx([0.7, 0.2])
    with pytest.raises(ValueError, match="no relevance rule for the attention at fusion/image_blocks.0/cross"):
        propagate([("fusion/image_blocks.0/cross", A)], 2, 1)


def test_weight_gradients_equal_finite_differences_at_every_attention(bundle, data_dir):
    """ViT (timm through mmqa's adapter), text encoder (transformers BERT) and fusion: the gradient of the
    answer's logit along a random change of each call's weights equals the logit's central difference."""
    model = copy.deepcopy(bundle.model).double().eval()
    pixels = bundle._images([shapes_test_images(data_dir)[0]]).double()
    enc = bundle.text_tokenizer([QUESTION], return_tensors="pt")
    idx = torch.zeros(1, dtype=torch.long)

    def logit(i: int = -1, change: torch.Tensor | None = None) -> float:  # the answer's logit, call i's weights moved
        seen = []

        def move(call, out):  # out = weights @ v: moving the weights by `change` moves out by change @ v
            seen.append(call)
            return out + change @ call.v if len(seen) - 1 == i else out

        with torch.no_grad(), intercept_attention(model, on_output=move):
            img = model.encode_images(pixels)
            q = model.encode_text(enc["input_ids"], enc["attention_mask"])
            return model.answer_logits(img, idx, q)[0][0, answer].item()

    answer = 3
    grads = weight_gradients(model, pixels, enc["input_ids"], enc["attention_mask"], answer)
    assert {c.stack for c, _ in grads} == {"image", "text", "fusion"}
    generator = torch.Generator().manual_seed(0)
    eps = 1e-4
    first = {}  # one call of each kind (ViT, text encoder, fusion self and cross) keeps the test short
    for i, (call, _) in enumerate(grads):
        first.setdefault((call.stack, call.site.rsplit("/", 1)[1]), i)
    assert len(first) == 4
    for i in first.values():
        call, grad = grads[i]
        change = torch.randn(grad.shape, generator=generator, dtype=torch.float64)
        numeric = (logit(i, eps * change) - logit(i, -eps * change)) / (2 * eps)
        assert (grad * change).sum().item() == pytest.approx(numeric, rel=1e-4, abs=1e-7), call.site


def test_relevance_leaves_outputs_and_parameter_gradients_as_they_were(bundle, data_dir):
    model = bundle.model
    pixels = bundle._images([shapes_test_images(data_dir)[0]])
    enc = bundle.text_tokenizer([QUESTION], return_tensors="pt")
    before = bundle.answer(shapes_test_images(data_dir)[0], QUESTION)
    relevance = answer_relevance(model, pixels, enc["input_ids"], enc["attention_mask"],
                                 bundle.answers.index(before.answer), prefix=1)
    g = model.grid
    assert relevance.shape == (g, g) and (relevance >= 0).all() and relevance.sum() > 0
    assert all(p.grad is None for p in model.parameters())
    after = bundle.answer(shapes_test_images(data_dir)[0], QUESTION)
    assert after.top == before.top  # nothing left hooked or changed
