"""LoRA and frozen towers (mmqa/compress/lora.py, `lora.*` and `freeze`): a step trains only the
adapters inside an adapted tower (its weights bit-identical) and everything outside it; merging
reproduces the adapted outputs with the plain layers; the bundle holds the merged model and the
adapter alone, which rebuilds the merged weights from the base ones; bad patterns and towers are
refused by key."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from safetensors.torch import load_file

from mmqa.build import build_experiment
from mmqa.bundle import WEIGHTS, Bundle
from mmqa.compress.lora import ADAPTER, add_lora, adapter_state, load_adapter, merged
from mmqa.errors import ConfigError
from mmqa.train import train


def _step(lit, batch):
    opt = torch.optim.AdamW([p for p in lit.parameters() if p.requires_grad], lr=1e-2)
    losses, _ = lit.compute_losses(batch)
    lit.total_loss(losses).backward()
    opt.step()


def test_a_step_trains_the_adapters_and_the_other_towers_and_merging_gives_the_same_outputs(tiny_parts):
    cfg, dm, model, lit, batch = tiny_parts("lora.r=4")
    names = {n for n, _ in model.named_parameters()}
    adapters = {n for n in names if ".lora_" in n}
    # the default target: q, k, v and the attention output of each text encoder layer, an A and a B each
    assert len(adapters) == cfg.model.text_encoder.depth * 4 * 2 and all(n.startswith("text_encoder.") for n in adapters)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapters | {n for n in names if not n.startswith("text_encoder.")}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lit.train()
    _step(lit, batch)
    after = dict(model.named_parameters())
    frozen = [n for n in names if n.startswith("text_encoder.") and n not in adapters]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)  # bit-identical
    assert all(not torch.equal(before[n], after[n]) for n in adapters if ".lora_B." in n)  # B starts at 0
    assert not torch.equal(before["vqa_head.net.4.weight"], after["vqa_head.net.4.weight"])

    lit.eval()
    plain = merged(model)
    assert not any(".lora_" in n for n, _ in plain.named_parameters())
    assert {n for n, _ in plain.named_parameters()} == {n.replace(".base_layer", "") for n in names - adapters}
    with torch.no_grad():
        tokens = model.text_encoder(batch.q_input_ids, batch.q_attention_mask).tokens  # (Q, T, D)
        again = plain.text_encoder(batch.q_input_ids, batch.q_attention_mask).tokens
    assert torch.allclose(tokens, again, atol=1e-5)
    base = dict(plain.named_parameters())["text_encoder.model.encoder.layer.0.attention.self.query.weight"]
    assert not torch.equal(base, before["text_encoder.model.encoder.layer.0.attention.self.query.base_layer.weight"])


def test_a_frozen_tower_keeps_its_weights(tiny_parts):
    cfg, dm, model, lit, batch = tiny_parts("freeze=[text_encoder,image_encoder]")
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    before = copy.deepcopy(model.text_encoder.state_dict())
    lit.train()
    _step(lit, batch)
    assert all(torch.equal(before[k], v) for k, v in model.text_encoder.state_dict().items())
    assert any(p.grad is not None for p in model.fusion.parameters())


def test_a_frozen_text_encoder_encodes_each_distinct_text_once_and_gives_what_a_fresh_pass_gives(tiny_parts):
    cfg, dm, model, lit, batch = tiny_parts("freeze=[text_encoder]")
    cache = model.text_cache
    assert cache is not None and cache.max_rows == cfg.text_cache
    ids, mask = batch.q_input_ids, batch.q_attention_mask  # (Q, T)
    rows = {tuple(r[m.bool()].tolist()) for r, m in zip(ids, mask)}
    lit.train()
    out = model.encode_text(ids, mask)
    assert model.text_encoder.training  # the tower ran in eval mode and was put back
    assert (cache.misses, cache.hits, len(cache.rows)) == (len(rows), len(ids) - len(rows), len(rows))
    model.text_encoder.eval()
    with torch.no_grad():
        enc = model.text_encoder(ids, mask)
        plain, pooled = model.text_proj(enc.tokens), model.text_proj(enc.pooled)  # (Q, T, D), (Q, D)
    real = mask.bool()
    assert torch.allclose(out.tokens[real], plain[real], atol=1e-5) and torch.allclose(out.pooled, pooled, atol=1e-5)
    assert torch.all(out.tokens[~real] == 0)
    # the same texts padded further are the same entries: no new pass, the same vectors
    padded = model.encode_text(torch.nn.functional.pad(ids, (0, 3)), torch.nn.functional.pad(mask, (0, 3)))
    assert cache.misses == len(rows) and cache.hits == 2 * len(ids) - len(rows)
    assert torch.equal(padded.tokens[:, : ids.shape[1]], out.tokens) and torch.equal(padded.pooled, out.pooled)

    assert tiny_parts("freeze=[text_encoder]", "lora.r=4")[2].text_cache is None  # adapters train inside it
    assert tiny_parts("freeze=[text_encoder]", "text_cache=0")[2].text_cache is None
    assert tiny_parts()[2].text_cache is None
    with pytest.raises(ValueError, match=r"only a frozen text encoder can be cached, but \d+ of its weights train"):
        tiny_parts()[2].cache_text(10)


def test_filling_the_cache_up_front_leaves_a_training_batch_nothing_to_encode(tiny_parts):
    cfg, dm, model, lit, batch = tiny_parts("freeze=[text_encoder]")
    from mmqa.train import fill_text_cache

    fill_text_cache(model, dm, rows_per_pass=5)  # several passes, each cut to its longest row
    records = dm.load_records()
    distinct = {t for s in ("train", "val") for r in records[s] for t in [*(qa.question for qa in r.questions), *r.captions]}
    cache = model.text_cache
    assert cache.misses == len(cache.rows) == len(distinct)  # val repeats some training texts: those hit
    hits = cache.hits
    model.encode_text(batch.q_input_ids, batch.q_attention_mask)
    model.encode_text(batch.c_input_ids, batch.c_attention_mask)
    assert cache.misses == len(distinct) and cache.hits - hits == len(batch.q_input_ids) + len(batch.c_input_ids)


def test_a_pretrained_tower_learns_at_its_lr_scale_and_its_adapters_at_the_full_rate(tiny_parts):
    cfg, dm, model, lit, batch = tiny_parts("lora.r=4", "freeze=[image_encoder]", "lr_scale.text_encoder=0.01", "lr_scale.fusion=0.5")
    lit._trainer = types.SimpleNamespace(estimated_stepping_batches=10)  # what configure_optimizers reads
    groups = lit.configure_optimizers()["optimizer"].param_groups
    lr = cfg.optim.lr
    rate = {id(p): g["initial_lr"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        if name.startswith("image_encoder."):
            assert id(p) not in rate  # frozen: not optimised at all
        elif ".lora_" in name:
            assert rate[id(p)] == pytest.approx(lr)
        elif name.startswith("fusion."):
            assert rate[id(p)] == pytest.approx(0.5 * lr)
        elif not name.startswith("text_encoder."):
            assert rate[id(p)] == pytest.approx(lr)
        if id(p) in decay:
            assert decay[id(p)] == (cfg.optim.weight_decay if p.ndim >= 2 else 0.0)
    # the text encoder's own weights are frozen by LoRA, so its scale applies to none: scale a plain run's
    cfg, dm, model, lit, batch = tiny_parts("lr_scale.text_encoder=0.01")
    lit._trainer = types.SimpleNamespace(estimated_stepping_batches=10)
    groups = lit.configure_optimizers()["optimizer"].param_groups
    rate = {id(p): g["initial_lr"] for g in groups for p in g["params"]}
    assert all(rate[id(p)] == pytest.approx(0.01 * lr) for p in model.text_encoder.parameters())
    assert [g["lr_scale"] for g in groups] == [1.0, 1.0, 0.01, 0.01]  # a plain run's two groups first, as before
    lit.lr_scale = {"text_encodr": 0.1}
    with pytest.raises(ConfigError, match=r"lr_scale: 'text_encodr' is not a tower of the model; towers: image_encoder, text_encoder"):
        lit.configure_optimizers()


def test_bad_patterns_and_towers_are_refused_by_key(tiny_parts):
    with pytest.raises(ConfigError, match=r"lora.target='nothing\\\\.here': it matches no module .*e\.g\. '"):
        tiny_parts("lora.r=4", r"lora.target=nothing\.here")
    with pytest.raises(ConfigError, match=r"lora.target='text_encoder': it matches \['text_encoder'\], which are not linear"):
        tiny_parts("lora.r=4", "lora.target=text_encoder")
    with pytest.raises(ConfigError, match=r"lora.target='\(' is not a regular expression: missing \)"):
        tiny_parts("lora.r=4", "lora.target='('")
    with pytest.raises(ConfigError, match=r"freeze: 'text_encodr' is not a tower of the model; towers: image_encoder, text_encoder"):
        tiny_parts("freeze=[text_encodr]")


def test_a_lora_run_writes_the_merged_bundle_and_the_adapter_alone(tiny_cfg, tmp_path):
    cfg = tiny_cfg("lora.r=4", "lora.alpha=8", "model/fusion=late", "trainer.max_epochs=1")
    metrics = train(cfg)
    assert metrics["model/trainable_parameters"] < metrics["model/parameters"]
    assert metrics["train/peak_rss_mb"] > 50
    path = tmp_path / "run" / "bundle"
    adapter = load_file(str(path / ADAPTER))
    assert len(adapter) == cfg.model.text_encoder.depth * 4 * 2 and all(".lora_" in k for k in adapter)
    assert not any(".lora_" in k or "base_layer" in k for k in load_file(str(path / WEIGHTS)))
    bundle = Bundle.load(path)  # the plain model: the evaluate, demo and serving path
    assert bundle.answer(_image(), "what color is the circle?").answer in bundle.answers

    # the adapter on the base weights (the run's text encoder as built, before training) gives the bundle's
    torch.manual_seed(cfg.seed)  # as train() seeded before building
    dm, lit = build_experiment(tiny_cfg("model/fusion=late"), assets=(bundle.text_tokenizer, bundle.decoder_tokenizer,
                                                                       bundle.answers, bundle.ingredients))
    rebuilt = load_adapter(lit.model, path / ADAPTER)
    saved = bundle.model.text_encoder.state_dict()
    assert all(torch.allclose(v, saved[k], atol=1e-6) for k, v in rebuilt.text_encoder.state_dict().items())
    assert adapter_state(rebuilt) == {}


def test_an_adapter_file_must_fit_the_model(tiny_parts, tmp_path):
    _, _, model, _, _ = tiny_parts()
    other = copy.deepcopy(model)
    add_lora(other, 4, 8, 0.0, r"text_encoder\..*\.query")
    from safetensors.torch import save_file

    save_file(adapter_state(other), str(tmp_path / "plain.safetensors"))
    with pytest.raises(Exception, match=r"plain.safetensors: not an mmqa LoRA adapter"):
        load_adapter(copy.deepcopy(model), tmp_path / "plain.safetensors")


def _image():
    from PIL import Image

    return Image.new("RGB", (64, 64), (200, 30, 30))
