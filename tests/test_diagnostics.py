"""The attention capture (mmqa/inspect/capture.py), the statistics it feeds, the diagnostics callback
and its alarms (mmqa/callbacks/), and the fixes it motivates (QK-norm, σReparam, ViT registers):
captured weights equal transformers' own eager weights and a hand softmax; capture changes no output
and restores every module; uniform attention has entropy 1 and one-hot 0 in every stack; the callback
logs the expected keys for each fusion and leaves training bit-identical; each alarm fires on a series
that should trigger it and stays silent on a healthy one; bad settings name their key."""

from __future__ import annotations

import copy
import csv
import logging
import math

import pytest
import torch
from safetensors.torch import load_file

from mmqa.bundle import WEIGHTS
from mmqa.callbacks.alarms import Alarms
from mmqa.callbacks.diagnostics import FFN_OUT, Diagnostics, block_of
from mmqa.inspect.capture import attention_modules, capture_attention, site_of
from mmqa.inspect.statistics import activation_stats, attention_entropy, call_entropy
from mmqa.models.fusion.anchored import AnchoredCrossAttention
from mmqa.models.layers import Attention
from mmqa.models.qk_norm import HeadNorm, add_qk_norm
from mmqa.models.sigma_reparam import SigmaReparam, apply_sigma_reparam
from mmqa.models.vit_attention import TimmAttention
from mmqa.train import train


@pytest.fixture
def parts(tiny_parts):
    cfg, dm, model, lit, batch = tiny_parts()
    return cfg, model.eval(), lit.eval(), batch


def losses(lit, batch) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return lit.compute_losses(batch)[0]


# ---------------------------------------------------------------------------- capture


def test_capture_sees_every_stack_changes_nothing_and_restores(parts):
    _, model, lit, batch = parts
    before = losses(lit, batch)
    attends = {n: m.attend for n, m in model.named_modules() if isinstance(m, (Attention, TimmAttention))}
    configs = {n: m.config for n, m in attention_modules(model) if hasattr(m, "config")}
    with capture_attention(model) as calls:
        during = losses(lit, batch)
    after = losses(lit, batch)
    for k in before:
        assert torch.equal(before[k], during[k]) and torch.equal(before[k], after[k]), k
    sites = {c.site for c in calls}
    assert {"image/blocks.0/self", "text/layer.0/self", "fusion/text_blocks.0/self", "fusion/text_blocks.0/cross",
            "decoder/h.0/self", "decoder/h.0/cross"} <= sites, sites
    assert all(m.attend is attends[n] for n, m in model.named_modules() if isinstance(m, (Attention, TimmAttention)))
    assert all(m.config is configs[n] and m.config._attn_implementation == "sdpa" for n, m in attention_modules(model)
               if hasattr(m, "config"))
    assert not any(hasattr(m, "_mmqa_capture") for m in model.modules())


def test_captured_weights_equal_transformers_eager_weights(parts):
    _, model, _, batch = parts
    bert, gpt2 = model.text_encoder.model, model.decoder.gpt2
    mask = batch.q_attention_mask.clone()
    mask[0, -3:] = 0  # padding in the first question, so the mask matters
    with capture_attention(bert) as calls, torch.no_grad():
        bert(input_ids=batch.q_input_ids, attention_mask=mask)
    eager = copy.deepcopy(bert)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        ref = eager(input_ids=batch.q_input_ids, attention_mask=mask, output_attentions=True).attentions
    assert len(calls) == len(ref)
    for call, w in zip(calls, ref):
        real = mask.bool()[:, None, :, None]  # eager gives padded query rows weights too: compare real rows
        torch.testing.assert_close(call.weights() * real, w * real, atol=1e-6, rtol=0)

    ids, dec_mask = batch.c_dec_input_ids, batch.c_dec_attention_mask
    memory = torch.randn(ids.shape[0], 5, gpt2.config.n_embd)
    with capture_attention(gpt2) as calls, torch.no_grad():
        gpt2(input_ids=ids, attention_mask=dec_mask, encoder_hidden_states=memory)
    eager = copy.deepcopy(gpt2)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(input_ids=ids, attention_mask=dec_mask, encoder_hidden_states=memory, output_attentions=True)
    own = [c for c in calls if c.site.endswith("/self")]
    cross = [c for c in calls if c.site.endswith("/cross")]
    real = dec_mask.bool()[:, None, :, None]
    for call, w in zip(own, out.attentions, strict=True):
        torch.testing.assert_close(call.weights() * real, w * real, atol=1e-6, rtol=0)
    for call, w in zip(cross, out.cross_attentions, strict=True):
        torch.testing.assert_close(call.weights(), w, atol=1e-6, rtol=0)


def test_captured_weights_equal_a_hand_softmax_in_mmqa_attention():
    torch.manual_seed(0)
    layer = Attention(16, 2).eval()
    x, ctx = torch.randn(3, 4, 16), torch.randn(3, 6, 16)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    with capture_attention(layer) as calls, torch.no_grad():
        layer(x, ctx, mask)
    q = layer.q(x).view(3, 4, 2, 8).transpose(1, 2)
    k = layer.kv(ctx)[..., :16].view(3, 6, 2, 8).transpose(1, 2)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(8)
    expected = scores.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
    torch.testing.assert_close(calls[0].weights(), expected)


def test_sites_name_the_stack_the_block_and_the_kind():
    assert site_of("fusion.text_blocks.1.cross_attn", "cross") == "fusion/text_blocks.1/cross"
    assert site_of("text_encoder.model.encoder.layer.0.attention.self", "self") == "text/layer.0/self"
    assert block_of("decoder.gpt2.transformer.h.1.mlp.c_proj.weight") == "decoder/h.1"
    assert block_of("vqa_head.net.0.weight") is None
    names = ["image_encoder.vit.blocks.0.mlp.fc2.weight", "fusion.blocks.0.mlp.net.3.bias",
             "decoder.gpt2.transformer.h.0.mlp.c_proj.weight", "text_encoder.model.encoder.layer.0.output.dense.weight"]
    assert all(FFN_OUT.search(n) for n in names)
    assert not FFN_OUT.search("text_encoder.model.encoder.layer.0.attention.output.dense.weight")
    assert not FFN_OUT.search("image_encoder.vit.blocks.0.mlp.fc1.weight")


# ---------------------------------------------------------------------------- statistics


def test_entropy_is_one_for_uniform_and_zero_for_one_hot():
    uniform = torch.full((2, 3, 4, 8), 1 / 8)
    assert torch.allclose(attention_entropy(uniform), torch.ones(3))
    one_hot = torch.zeros(2, 3, 4, 8)
    one_hot[..., 5] = 1
    assert torch.equal(attention_entropy(one_hot), torch.zeros(3))
    # uniform over the 3 visible keys of each row is 1 too; a query with one key is left out
    visible = torch.zeros(1, 1, 4, 8, dtype=torch.bool)
    visible[..., :3] = True
    visible[0, 0, 0] = False
    visible[0, 0, 0, 0] = True
    w = visible.float() / visible.sum(-1, keepdim=True)
    assert torch.allclose(attention_entropy(w.expand(2, 3, 4, 8), visible), torch.ones(3))
    assert attention_entropy(one_hot[:, :, :1], visible[:, :, :1]).isnan().all()  # nothing to count


def _zero_queries(model) -> None:
    """Zero every attention's query projection: each query then attends uniformly to what it may see."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (Attention, AnchoredCrossAttention)):  # anchored: its offset bias is zero at init
                m.q.weight.zero_(), m.q.bias.zero_()
            elif isinstance(m, TimmAttention):
                dim = m.qkv.weight.shape[1]
                m.qkv.weight[:dim].zero_(), m.qkv.bias[:dim].zero_()
            elif type(m).__name__ == "BertSelfAttention":
                m.query.weight.zero_(), m.query.bias.zero_()
            elif type(m).__name__ == "GPT2Attention":
                if m.is_cross_attention:
                    m.q_attn.weight.zero_(), m.q_attn.bias.zero_()
                else:
                    m.c_attn.weight[:, : m.embed_dim].zero_(), m.c_attn.bias[: m.embed_dim].zero_()


def test_uniform_attention_has_entropy_one_in_every_stack(parts):
    _, model, lit, batch = parts
    _zero_queries(model)
    with capture_attention(model) as calls:
        losses(lit, batch)
    kinds = {type(m).__name__ for _, m in attention_modules(model)}
    assert {"TimmAttention", "BertSelfAttention", "Attention", "GPT2Attention"} <= kinds
    for call in calls:
        torch.testing.assert_close(call_entropy(call), torch.ones(call.q.shape[1]), atol=1e-5, rtol=0,
                                   msg=call.site)


def test_one_hot_attention_has_entropy_zero_through_the_capture():
    layer = Attention(8, 1).eval()
    with torch.no_grad():
        layer.q.weight.zero_(), layer.q.bias.fill_(10.0)  # every query is (10, ..., 10)
        layer.kv.weight.zero_(), layer.kv.bias.zero_()
        layer.kv.weight[:8].copy_(torch.eye(8))  # keys are the inputs
    ctx = torch.zeros(2, 5, 8)
    ctx[:, 3] = 10.0  # key 3 scores 800 / sqrt(8); the others 0
    with capture_attention(layer) as calls, torch.no_grad():
        layer(torch.randn(2, 4, 8), ctx, torch.ones(2, 5, dtype=torch.bool))
    assert call_entropy(calls[0]).item() == pytest.approx(0.0, abs=1e-6)


def test_artefact_tokens_are_counted():
    x = torch.ones(2, 10, 4)
    x[0, 3] *= 20  # one token with 20x the median norm
    rms, artefacts = activation_stats(x, factor=5.0)
    assert artefacts == pytest.approx(1 / 20) and rms > 1


# ---------------------------------------------------------------------------- alarms


def alarms(**kw) -> Alarms:
    settings = dict(spike_warmup_steps=0, collapse_fraction=0.5, baseline_probes=2, spike_factor=10.0, spike_window=20, min_history=3,
                    max_activation_rms=100.0) | kw
    return Alarms(**settings)


def test_collapse_alarm_fires_once_when_entropy_falls_and_never_on_a_healthy_series():
    a = alarms()
    fired = [a.entropy("image/blocks.1/self", s, v) for s, v in enumerate([0.9, 0.8, 0.7, 0.5, 0.3, 0.1, 0.05])]
    raised = [x for x in fired if x]
    assert len(raised) == 1 and raised[0].step == 4 and raised[0].kind == "collapse"
    assert "step 4: image/blocks.1/self" in raised[0].message() and "0.300" in raised[0].message()  # below 0.5 x 0.85
    healthy = alarms()
    assert not any(healthy.entropy("x", s, 0.8 + 0.05 * (-1) ** s) for s in range(50))


def test_spike_alarm_fires_on_a_jump_past_k_times_the_running_median():
    a = alarms()
    values = [1.0, 1.2, 0.9, 1.1, 1.0, 15.0, 1.0, 1.1]
    raised = [x for x in (a.grad_norm("fusion/text_blocks.0/ffn_out", s, v) for s, v in enumerate(values)) if x]
    assert [(x.kind, x.step, x.value) for x in raised] == [("spike", 5, 15.0)]
    healthy = alarms()
    assert not any(healthy.grad_norm("g", s, 1 + 0.5 * math.sin(s)) for s in range(100))


def test_gradient_norms_before_the_warmup_are_not_judged():
    a = alarms(spike_warmup_steps=100)
    assert not any(a.grad_norm("g", s, 0.01 * 2 ** (s / 10)) for s in range(100))  # rising a thousand-fold
    assert not any(a.grad_norm("g", s, 1.0) for s in range(100, 110))
    assert a.grad_norm("g", 110, 50.0).step == 110


def test_activation_and_non_finite_alarms_report_and_never_raise():
    a = alarms()
    assert a.activation("image/blocks.0", 3, 50.0) is None
    big = a.activation("image/blocks.0", 4, 500.0)
    assert big.kind == "activation" and big.step == 4 and "500" in big.message()
    nan = a.grad_norm("text", 7, float("nan"))
    assert nan.kind == "non_finite" and "nan" in nan.message()
    assert a.entropy("x", 1, float("inf")).kind == "non_finite"


@pytest.mark.parametrize("key,value,match", [
    ("collapse_fraction", 1.5, "collapse_fraction must be > 0.0 and <= 1.0; got 1.5"),
    ("spike_factor", 0.5, "spike_factor must be > 1.0"),
    ("every_n_steps", 0, "callbacks.diagnostics.every_n_steps must be >= 1; got 0"),
    ("stacks", ["image", "vision"], r"stacks: unknown \['vision'\]; valid: image, text, fusion, decoder"),
])
def test_bad_settings_name_their_key(key, value, match):
    with pytest.raises(ValueError, match=match):
        Diagnostics(**{key: value})


# ---------------------------------------------------------------------------- the callback in training


def read_csv_keys(run) -> set[str]:
    with (run / "csv" / "version_0" / "metrics.csv").open() as f:
        return set(next(csv.reader(f)))


@pytest.mark.parametrize("fusion,sites", [
    ("cross", ["fusion/text_blocks.0/self", "fusion/text_blocks.1/cross"]),
    ("early", ["fusion/blocks.0/self"]),
    ("late", []),
])
def test_callback_logs_every_stack_for_each_fusion(tiny_cfg, tmp_path, fusion, sites):
    cfg = tiny_cfg("callbacks=diagnostics", "callbacks.diagnostics.every_n_steps=2", f"model/fusion={fusion}")
    metrics = train(cfg)
    run = tmp_path / "run"
    keys = read_csv_keys(run)
    for site in ["image/blocks.0/self", "text/layer.0/self", "decoder/h.0/self", "decoder/h.0/cross", *sites]:
        assert f"diag/entropy/{site}/h0" in keys and f"diag/max_logit/{site}/h1" in keys, site
    assert not fusion == "late" or not any(k.startswith("diag/entropy/fusion") for k in keys)
    for key in ["diag/act_rms/image/blocks.0", "diag/artefacts/decoder/h.0", "diag/grad_norm/fusion",
                "diag/grad_norm/decoder/h.0/ffn_out", "diag/grad_norm/text/layer.0/ffn_out"]:
        assert key in keys, key
    assert metrics["diag/alarms"] >= 0 and "diag/first_alarm_step" in metrics
    files = {p.name for p in (run / "diagnostics").iterdir()}
    assert {"diagnostics.csv", "alarms.csv", "summary.md", "entropy_image.png", "act_rms.png", "grad_norm.png"} <= files
    assert ("entropy_fusion.png" in files) == bool(sites)
    assert "| image/blocks.0/self |" in (run / "diagnostics" / "summary.md").read_text()


def test_training_is_bit_identical_with_the_callback_on_and_off(tiny_cfg, tmp_path):
    weights = tmp_path / "run" / "bundle" / WEIGHTS
    off = train(tiny_cfg())
    off_weights = load_file(weights)
    on = train(tiny_cfg("callbacks=diagnostics", "callbacks.diagnostics.every_n_steps=1"))
    assert (tmp_path / "run" / "diagnostics" / "summary.md").is_file()  # the callback did run
    timing = ("train/fit_seconds", "train/images_per_second", "train/step_seconds", "train/peak_rss_mb")
    compared = [k for k in off if k not in timing]
    assert "test/vqa_acc" in compared and "val/vqa_loss" in compared
    assert {k: off[k] for k in compared} == {k: on[k] for k in compared}
    on_weights = load_file(weights)
    assert off_weights.keys() == on_weights.keys()
    assert all(torch.equal(off_weights[k], on_weights[k]) for k in off_weights)


# ---------------------------------------------------------------------------- the fixes


def test_qk_norm_bounds_the_logits():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16) * 100  # huge activations
    for qk_norm, bounded in ((False, False), (True, True)):
        layer = Attention(16, 2, qk_norm=qk_norm).eval()
        with capture_attention(layer) as calls, torch.no_grad():
            y, _ = layer(x, x, torch.ones(2, 5, dtype=torch.bool))
        assert y.shape == (2, 5, 16)
        assert (calls[0].logits().abs().max().item() <= math.sqrt(8) + 1e-4) == bounded  # |LN(q).LN(k)|/sqrt(d) <= sqrt(d)


def test_qk_norm_in_transformers_modules_bounds_their_logits(parts):
    _, model, lit, batch = parts
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)  # logits grow with the square of the projections' scale
    assert add_qk_norm(model.text_encoder) == 1 and add_qk_norm(model.decoder) == 2  # BERT 1 layer, GPT-2 self + cross
    with capture_attention(model, include=r"^(text_encoder|decoder)") as calls:
        losses(lit, batch)
    assert {c.stack for c in calls} == {"text", "decoder"}
    for call in calls:
        d = call.q.shape[-1]
        assert call.logits().masked_fill(call.logits().isinf(), 0).abs().max() <= d ** 0.5 * call.scale * d ** 0.5 + 1e-3


def test_sigma_reparam_starts_as_the_identity_and_normalises_the_spectrum():
    torch.manual_seed(0)
    layer = Attention(16, 2)
    x = torch.randn(2, 5, 16)
    mask = torch.ones(2, 5, dtype=torch.bool)
    before, _ = layer(x, x, mask)
    assert apply_sigma_reparam(layer) == 3
    after, _ = layer(x, x, mask)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
    reparam: SigmaReparam = layer.q.parametrizations.weight[0]
    with torch.no_grad():
        reparam.gamma.fill_(2.0)
    assert torch.linalg.matrix_norm(layer.q.weight, ord=2).item() == pytest.approx(2.0, rel=1e-3)


def test_each_fix_keeps_shapes_and_trains(tiny_parts, tiny_cfg, caplog):
    caplog.set_level(logging.INFO, logger="mmqa")
    fixes = ("model.qk_norm=true", "model.sigma_reparam=true", "model.image_encoder.reg_tokens=2")
    _, _, model, _, batch = tiny_parts(*fixes)
    vit = model.image_encoder.vit
    assert vit.num_prefix_tokens == 3 and vit.blocks[0].attn.layout.segments[0] == ("global", 3)  # CLS + 2 registers
    assert isinstance(vit.blocks[0].attn.q_norm, torch.nn.LayerNorm)
    assert isinstance(model.fusion.text_blocks[0].cross_attn.k_norm, torch.nn.LayerNorm)
    assert hasattr(model.fusion.text_blocks[0].cross_attn.q, "parametrizations")
    gpt2 = model.decoder.gpt2.transformer.h[0]
    assert isinstance(gpt2.attn.c_attn, HeadNorm) and isinstance(gpt2.crossattention.q_attn, HeadNorm)
    assert hasattr(gpt2.attn.c_attn.proj, "parametrizations")  # σReparam first, then the QK-norm wrapper
    assert isinstance(model.text_encoder.model.encoder.layer[0].attention.self.key, HeadNorm)
    assert model.encode_images(batch.images).tokens.shape == (len(batch.images), model.grid ** 2, model.dim)
    metrics = train(tiny_cfg(*fixes))
    assert math.isfinite(metrics["val/vqa_loss"]) and 0 <= metrics["test/vqa_acc"] <= 1
    assert "attention projections reparametrised" in caplog.text and "QK-layernorm" in caplog.text
