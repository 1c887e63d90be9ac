"""Every fusion variant, listed from conf/model/fusion/ (the registry): shapes, masks, that the output
depends on the right image and on the question, and attention maps on request."""

from __future__ import annotations

import pytest
import torch
from conftest import CONF
from hydra.utils import instantiate
from omegaconf import OmegaConf

VARIANTS = sorted(p.stem for p in (CONF / "model" / "fusion").glob("*.yaml"))
D, N, T, B, Q = 32, 16, 7, 3, 5


def test_registry_lists_the_designs():
    assert VARIANTS == ["anchored", "cross", "early", "late", "relation"]


def build(name: str, at_init: bool = False, **extra):
    """The variant at the test width; its zero-initialised extras randomised unless `at_init` (as a run
    builds it)."""
    cfg = OmegaConf.load(CONF / "model" / "fusion" / f"{name}.yaml")
    cfg.dim, cfg.dropout = D, 0.0  # the YAML reads both from ${model.*}
    if "attention" in cfg:
        cfg.attention = None  # ${model.attention}: None is sdpa (tests/test_attention_model.py tries the rest)
    if "qk_norm" in cfg:
        cfg.qk_norm = False  # ${model.qk_norm} (tests/test_diagnostics.py tries it)
    for k, v in extra.items():
        cfg[k] = v
    torch.manual_seed(0)
    fusion = instantiate(cfg).eval()
    if at_init:
        return fusion
    if name == "relation":  # its relation term starts at zero; random weights, so every test here sees it
        torch.nn.init.normal_(fusion.f[1].weight, std=0.5)
    if name == "anchored":  # likewise its position bias and position read
        for block in fusion.text_blocks:
            torch.nn.init.normal_(block.cross_attn.gate.weight, std=0.5)
            torch.nn.init.normal_(block.cross_attn.read.weight, std=0.5)
    return fusion


def inputs():
    g = torch.Generator().manual_seed(1)
    img = torch.randn(B, N, D, generator=g)  # (B, N, D)
    img_mask = torch.ones(B, N, dtype=torch.bool)
    txt = torch.randn(Q, T, D, generator=g)  # (Q, T, D)
    txt_mask = torch.ones(Q, T, dtype=torch.bool)
    txt_mask[0, 4:] = False  # question 0 has 4 real tokens
    img_idx = torch.tensor([0, 0, 1, 2, 2])  # (Q,)
    return img, img_mask, txt, txt_mask, img_idx


@pytest.mark.parametrize("name", VARIANTS)
def test_output_shapes(name):
    out = build(name)(*inputs())
    assert out.pooled.shape == (Q, D)
    assert out.tokens.shape == (Q, T, D)
    assert torch.isfinite(out.pooled).all()


@pytest.mark.parametrize("name", VARIANTS)
def test_padding_is_ignored(name):
    fusion = build(name)
    img, img_mask, txt, txt_mask, idx = inputs()
    before = fusion(img, img_mask, txt, txt_mask, idx).pooled
    txt2 = txt.clone()
    txt2[0, 4:] = 100.0  # garbage in question 0's padding
    assert torch.allclose(before, fusion(img, img_mask, txt2, txt_mask, idx).pooled, atol=1e-5)
    img_mask[1, 10:] = False  # image 1's last patches are padding from here on
    img2 = img.clone()
    img2[1, 10:] = 100.0  # garbage in image 1's masked patches
    assert torch.allclose(fusion(img, img_mask, txt, txt_mask, idx).pooled,
                          fusion(img2, img_mask, txt, txt_mask, idx).pooled, atol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_output_depends_on_its_own_image_and_question(name):
    fusion = build(name)
    img, img_mask, txt, txt_mask, idx = inputs()
    base = fusion(img, img_mask, txt, txt_mask, idx).pooled
    img2 = img.clone()
    img2[1] += torch.randn(N, D)  # only question 2 looks at image 1
    changed = (fusion(img2, img_mask, txt, txt_mask, idx).pooled - base).abs().amax(-1) > 1e-4
    assert changed.tolist() == [False, False, True, False, False]
    txt2 = txt.clone()
    txt2[3] += torch.randn(T, D)
    changed = (fusion(img, img_mask, txt2, txt_mask, idx).pooled - base).abs().amax(-1) > 1e-4
    assert changed.tolist() == [False, False, False, True, False]


@pytest.mark.parametrize("name", VARIANTS)
def test_attention_maps_on_request(name):
    fusion = build(name)
    plain = fusion(*inputs())
    out = fusion(*inputs(), return_attention=True)
    assert plain.attention is None
    assert torch.allclose(plain.pooled, out.pooled, atol=1e-5)  # asking for maps changes nothing
    if name == "late":
        assert out.attention is None  # no patch-level attention to show
        return
    assert out.attention.shape == (Q, 4, T, N)
    assert (out.attention >= 0).all()
    sums = out.attention.sum(-1)  # over image patches
    if name in ("anchored", "cross", "relation"):
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    else:  # early fusion also attends to text tokens, so only part of the mass is on the image
        assert (sums <= 1 + 1e-5).all() and (sums > 0).all()


def test_bidirectional_cross_fusion_lets_the_image_attend_back():
    fusion = build("cross", bidirectional=True)
    img, img_mask, txt, txt_mask, idx = inputs()
    out = fusion(img, img_mask, txt, txt_mask, idx)
    assert out.pooled.shape == (Q, D)
    assert len(fusion.image_blocks) == len(fusion.text_blocks)
    # with depth 2, the second text layer reads image tokens that have seen the question
    txt2 = txt.clone()
    txt2[3] += torch.randn(T, D)
    changed = (fusion(img, img_mask, txt2, txt_mask, idx).pooled - out.pooled).abs().amax(-1) > 1e-4
    assert changed.tolist() == [False, False, False, True, False]


# ------------------------------------------------------------------------------- relation fusion


def test_relation_term_ignores_token_order_and_sees_positions():
    fusion = build("relation", tokens=6)
    img, img_mask, txt, txt_mask, idx = inputs()
    q = torch.randn(Q, D, generator=torch.Generator().manual_seed(2))
    pos = torch.rand(B, N, 2, generator=torch.Generator().manual_seed(3)) * 2 - 1  # (B, N, 2)
    base = fusion.relate(img, img_mask, pos, q, idx)  # (Q, D)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(fusion.relate(img[:, perm], img_mask[:, perm], pos[:, perm], q, idx), base, atol=1e-5)
    # the same contents at other places: each image's two best-scoring tokens trade places
    top2 = fusion.score(img).squeeze(-1).topk(2, dim=1).indices  # (B, 2)
    swapped = pos.clone()
    rows = torch.arange(B)
    swapped[rows, top2[:, 0]], swapped[rows, top2[:, 1]] = pos[rows, top2[:, 1]], pos[rows, top2[:, 0]]
    assert ((fusion.relate(img, img_mask, swapped, q, idx) - base).abs().amax(-1) > 1e-3).all()


def left_of_task(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of a 4 x 4 grid holding object A and object B in two columns, nothing else: the
    tokens say what is there, not where (no position encoding). Label: is A left of B?"""
    tokens = torch.randn(n, 16, D, generator=g) * 0.1  # (n, 16, D) background
    labels = torch.zeros(n)
    for k in range(n):
        cols = torch.randperm(4, generator=g)[:2]
        rows = torch.randint(0, 4, (2,), generator=g)
        a, b = (rows * 4 + cols).tolist()
        tokens[k, a, 0] += 3.0  # object A
        tokens[k, b, 1] += 3.0  # object B
        labels[k] = float(cols[0] < cols[1])
    return tokens, labels


def test_cross_fusion_cannot_tell_where_things_are_without_position_in_the_tokens():
    """Cross-attention reads a set: shuffling the image tokens changes nothing, so without a
    position encoding in the tokens it cannot answer left/right at all. The relation term can."""
    fusion = build("cross")
    img, img_mask, txt, txt_mask, idx = inputs()
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(fusion(img[:, perm], img_mask, txt, txt_mask, idx).pooled,
                          fusion(img, img_mask, txt, txt_mask, idx).pooled, atol=1e-5)


def left_of_accuracy(fusion: torch.nn.Module) -> float:
    """Train `fusion` and a linear head for 100 steps on `left_of_task` with one fixed question
    ("is A left of B?"); the accuracy on 400 new images."""
    g = torch.Generator().manual_seed(0)
    fusion.train()
    head = torch.nn.Linear(D, 1)
    opt = torch.optim.Adam([*fusion.parameters(), *head.parameters()], lr=3e-3)
    question = torch.randn(1, 1, D, generator=g)

    def logits(img: torch.Tensor) -> torch.Tensor:  # (n,)
        n = img.shape[0]
        out = fusion(img, torch.ones(n, 16, dtype=torch.bool), question.expand(n, 1, D),
                     torch.ones(n, 1, dtype=torch.bool), torch.arange(n))
        return head(out.pooled).squeeze(-1)

    for _ in range(100):
        img, labels = left_of_task(32, g)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits(img), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    img, labels = left_of_task(400, g)
    with torch.no_grad():
        fusion.eval()
        return ((logits(img) > 0).float() == labels).float().mean().item()


def test_the_relation_term_learns_left_of_from_positions_alone():
    """Object tokens without any position encoding; is A left of B? The pairs' grid offsets are
    the only place that can come from, and 100 steps learn it."""
    accuracy = left_of_accuracy(build("relation", depth=1, relation_dim=16))
    assert accuracy >= 0.95, accuracy


# ------------------------------------------------------------------------------- anchored fusion


def test_anchored_fusion_sees_where_tokens_are():
    """Unlike cross fusion (above), the same image tokens in other places give another answer, and at
    step 0 (bias and read at zero) the variant is exactly cross fusion."""
    fusion = build("anchored")
    img, img_mask, txt, txt_mask, idx = inputs()
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(4))
    moved = fusion(img[:, perm], img_mask, txt, txt_mask, idx).pooled
    assert ((moved - fusion(img, img_mask, txt, txt_mask, idx).pooled).abs().amax(-1) > 1e-3).all()

    fresh = build("cross")
    anchored = build("anchored", at_init=True)
    anchored.load_state_dict(fresh.state_dict(), strict=False)  # cross fusion's weights; the new maps stay at zero
    assert torch.allclose(anchored(*inputs()).pooled, fresh(*inputs()).pooled, atol=1e-5)


def test_anchored_fusion_learns_left_of_from_positions_alone():
    """The relation test's task: the read of where each head looked carries both objects' places."""
    accuracy = left_of_accuracy(build("anchored", at_init=True, depth=1))
    assert accuracy >= 0.95, accuracy


def test_the_anchored_bias_points_where_its_offset_features_say():
    """Content-free queries and keys; every head anchored on patch 5 of a 4 x 4 grid, (-1/3, -1/3). A
    head weighing relu(-dx) looks left, -|d| looks at the anchor, -"at the anchor" anywhere but
    there, relu(dy) looks down (rows grow downwards)."""
    from mmqa.models.fusion.anchored import OFFSET_FEATURES, AnchoredCrossAttention

    attn = AnchoredCrossAttention(D, heads=4, radius=0.3).eval()
    with torch.no_grad():
        for layer in (attn.q, attn.anchor, attn.gate):
            layer.weight.zero_()
        attn.q.bias.zero_()
        attn.anchor.bias.copy_(torch.full((8,), -1 / 3).atanh())
        gate = torch.zeros(4, OFFSET_FEATURES)
        gate[0, 2], gate[1, 4], gate[2, 5], gate[3, 1] = 8.0, -8.0, -8.0, 8.0  # relu(-dx), |d|, at anchor, relu(dy)
        attn.gate.bias.copy_(gate.flatten())
    x, context = torch.randn(1, 1, D), torch.randn(1, 16, D)
    _, w = attn(x, context, torch.ones(1, 16, dtype=torch.bool), need_weights=True)
    w = w[0, :, 0].view(4, 4, 4)  # (head, row, column)
    assert w[0, :, 0].sum() > 0.9  # left: the first column
    assert w[1].flatten().argmax().item() == 5  # near: the anchor's own patch
    assert w[2].flatten()[5] < 0.01 and w[2].flatten()[0] > 0.05  # not at the anchor; elsewhere as usual
    assert w[3, 3].sum() > 0.9  # down: the last row


@pytest.mark.parametrize("n", [16, 6])  # a 4 x 4 grid; 6 tokens, not a square: one row
def test_the_anchored_bias_equals_its_formula(n):
    """offset_bias computes the half-plane terms per column and row and broadcasts them: it must equal
    g . phi(p_j - c) written out patch by patch, phi = (relu(dx), relu(dy), relu(-dx), relu(-dy), |d|,
    relu(1 - |d| / radius))."""
    from mmqa.models.fusion.anchored import OFFSET_FEATURES, AnchoredCrossAttention

    attn = AnchoredCrossAttention(D, heads=2, radius=0.3)
    g = torch.Generator().manual_seed(0)
    anchor = torch.rand(3, 2, 5, 2, generator=g) * 2 - 1  # (B, h, T, 2)
    gate = torch.randn(3, 2, 5, OFFSET_FEATURES, generator=g)  # (B, h, T, 6)
    p = _grid(n)  # (N, 2)
    d = p - anchor[..., None, :]  # (B, h, T, N, 2)
    dist = d.norm(dim=-1)
    phi = torch.stack([d[..., 0].relu(), d[..., 1].relu(), (-d[..., 0]).relu(), (-d[..., 1]).relu(), dist,
                       (1 - dist / 0.3).relu()], -1)  # (B, h, T, N, 6)
    expected = (phi * gate[..., None, :]).sum(-1)  # (B, h, T, N)
    torch.testing.assert_close(attn.offset_bias(p, anchor, gate), expected, atol=1e-5, rtol=0)


def test_heads_past_anchored_heads_read_by_content_alone():
    from mmqa.models.fusion.anchored import AnchoredCrossAttention

    with pytest.raises(ValueError, match="anchored_heads 5 must be between 1 and heads \\(4\\)"):
        AnchoredCrossAttention(D, heads=4, radius=0.3, anchored_heads=5)
    torch.manual_seed(0)
    attn = AnchoredCrossAttention(D, heads=4, radius=0.3, anchored_heads=2).eval()
    x, context, mask = torch.randn(2, 3, D), torch.randn(2, 16, D), torch.ones(2, 16, dtype=torch.bool)
    _, before = attn(x, context, mask, need_weights=True)
    with torch.no_grad():
        torch.nn.init.normal_(attn.gate.weight, std=0.5)  # (2 heads x 6 features, D)
    _, after = attn(x, context, mask, need_weights=True)
    assert attn.gate.out_features == 12
    assert torch.allclose(after[:, 2:], before[:, 2:])  # heads 2 and 3: content only
    assert not torch.allclose(after[:, :2], before[:, :2], atol=1e-3)


def test_a_sink_leaves_mass_that_grows_with_what_matches():
    """With a null key, the weights are exp(l_j) / (exp(s) + sum exp(l_k)); the mass a head reads back
    grows with the number of patches that match its query, where a plain softmax's is always 1."""
    from mmqa.models.fusion.anchored import biased_attention

    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 16, 8)
    v, sink = torch.randn(2, 3, 16, 5), torch.randn(2, 3, 4)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 10:] = False
    out, w = biased_attention(q, k, v, mask, return_weights=True, sink=sink)
    logits = (q @ k.transpose(-2, -1)) / 8 ** 0.5
    e = logits.exp() * mask[:, None, None, :]
    expected = e / (sink.exp()[..., None] + e.sum(-1, keepdim=True))
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(out, expected @ v)
    assert (w.sum(-1) < 1).all() and w[1, ..., 10:].abs().max() == 0
    # one query that matches a patch with logit 4 above the rest: its mass counts the matching patches
    k = torch.zeros(1, 1, 16, 8)
    q = torch.zeros(1, 1, 1, 8)
    q[..., 0] = 4 * 8 ** 0.5
    mass = []
    for n in range(5):
        k[..., :n, 0] = 1.0
        ones = torch.ones(1, 1, 16, 1)
        mass.append(biased_attention(q, k, ones, sink=torch.full((1, 1, 1), 6.0)).item())
        plain = biased_attention(q, k, ones).item()
        assert plain == pytest.approx(1.0)
    assert all(b > a + 0.05 for a, b in zip(mass, mass[1:])), mass


@pytest.mark.parametrize("sink", [False, True])
def test_the_inspect_capture_sees_the_anchored_cross_attention_with_its_bias(sink):
    """The capture records each anchored call with its offset bias (and sink), so the weights it rebuilds
    are the ones the module applied; a head masked through it loses its content and its position read."""
    from mmqa.inspect.capture import attention_modules, capture_attention, uncovered
    from mmqa.inspect.heads import head_counts, head_mask
    from mmqa.models.fusion.anchored import AnchoredCrossAttention

    torch.manual_seed(0)
    attn = AnchoredCrossAttention(D, heads=4, radius=0.3, anchored_heads=2, sink=sink).eval()
    with torch.no_grad():
        for layer in (attn.gate, attn.read) + ((attn.sink,) if sink else ()):  # trained-like: not zero
            torch.nn.init.normal_(layer.weight, std=0.5)
    x, context, mask = torch.randn(2, 3, D), torch.randn(2, 16, D), torch.ones(2, 16, dtype=torch.bool)
    assert [n for n, _ in attention_modules(attn)] == [""] and uncovered(attn) == []
    with torch.no_grad():
        plain, weights = attn(x, context, mask, need_weights=True)
        with capture_attention(attn) as calls:
            captured, _ = attn(x, context, mask)
        assert torch.equal(captured, plain)  # the capture only listens
        (call,) = calls
        assert call.bias.shape == (2, 4, 3, 16) and call.bias[:, 2:].abs().max() == 0  # heads 2, 3: no bias
        torch.testing.assert_close(call.weights(), weights, atol=1e-6, rtol=0)
        assert (call.sink is not None) == sink and (weights.sum(-1).min() < 0.5) == sink  # the sink takes mass
        (site,) = head_counts(attn)  # a layer alone: the site has no stack or block
        with head_mask(attn, {site: torch.tensor([1.0, 0.0, 1.0, 1.0])}):
            masked, _ = attn(x, context, mask)
        # by hand: head 1's values, position and mass read are all zero
        out = weights @ torch.cat([attn.kv(context).view(2, 16, 2, 4, -1)[:, :, 1].transpose(1, 2),
                                   _grid(16).expand(2, 4, 16, 2), torch.ones(2, 4, 16, 1)], -1)  # (B, h, T, d + 3)
        out[:, 1] = 0
        y, looked, m = out.split([D // 4, 2, 1], -1)
        anchor = torch.tanh(attn.anchor(x)).view(2, 3, 4, 2).transpose(1, 2)
        where = torch.cat([looked, looked - anchor * m] + ([m] if sink else []), -1).transpose(1, 2).reshape(2, 3, -1)
        expected = attn.out(y.transpose(1, 2).reshape(2, 3, D)) + attn.read(where)
    torch.testing.assert_close(masked, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(masked, plain, atol=1e-3)


def _grid(n: int) -> torch.Tensor:
    from mmqa.models.fusion.relation import grid_positions

    return grid_positions(n, torch.device("cpu"), torch.float32)


# ------------------------------------------------------------------------------- attention pooling


def _which_is_left(pool: torch.nn.Module, steps: int = 200) -> float:
    """Two tokens, a role marker (asked-about, reference) plus the object's x in the first channel,
    among padding-free filler; answer: is the asked-about object left of the reference? A mean adds
    both tokens up, so the two x's arrive as one sum, and the answer is not in it."""
    g = torch.Generator().manual_seed(0)
    roles = torch.randn(2, D, generator=g)

    def batch(n: int):
        x = torch.rand(n, 2, generator=g) * 2 - 1  # (n, 2): x of the asked-about, of the reference
        tokens = torch.randn(n, 4, D, generator=g) * 0.1  # (n, T, D): two fillers after the two objects
        tokens[:, :2] += roles
        tokens[:, :2, 0] += 3 * x
        order = torch.rand(n, generator=g) < 0.5  # the reference first in half the questions
        tokens[order, :2] = tokens[order, :2].flip(1)
        return tokens, torch.ones(n, 4, dtype=torch.bool), (x[:, 0] < x[:, 1]).long()

    head = torch.nn.Sequential(torch.nn.Linear(D, 64), torch.nn.GELU(), torch.nn.Linear(64, 2))
    params = list(head.parameters()) + list(pool.parameters()) if isinstance(pool, torch.nn.Module) else list(head.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    for _ in range(steps):
        tokens, mask, y = batch(128)
        loss = torch.nn.functional.cross_entropy(head(pool(tokens, mask)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    tokens, mask, y = batch(1000)
    with torch.no_grad():
        return (head(pool(tokens, mask)).argmax(-1) == y).float().mean().item()


def test_attention_pooling_starts_as_the_mean_and_keeps_two_objects_apart():
    from mmqa.models.layers import AttentionPool, masked_mean

    pool = AttentionPool(D, queries=2)
    tokens, mask = torch.randn(3, 5, D), torch.tensor([[1, 1, 1, 0, 0]] * 3, dtype=torch.bool)
    torch.testing.assert_close(pool(tokens, mask), masked_mean(tokens, mask))  # step 0: the mean
    tokens[:, 3:] = 1e3  # padding is never read
    torch.testing.assert_close(pool(tokens, mask), masked_mean(tokens, mask))
    mask[0] = False  # a row of padding only reads nothing, and passes no NaN back
    torch.nn.init.normal_(pool.mix.weight)
    pool(tokens, mask).sum().backward()
    assert pool.score.weight.grad.isfinite().all() and pool.mix.weight.grad.isfinite().all()
    assert _which_is_left(masked_mean) < 0.6  # the sum of the two places does not say which is left
    assert _which_is_left(AttentionPool(D, queries=2)) > 0.9
