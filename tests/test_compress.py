"""Compressed bundles (mmqa/compress/): INT8 layers against fp32 within a stated tolerance, every
Linear and GPT-2 Conv1D swapped, the int8 bundle written as int8 safetensors that `Bundle.load`
rebuilds exactly, served by the demo and scored by evaluate; pruned models with smaller matrices that
compute what the original computes with those heads and neurons masked, pruned bundles that load at
their new sizes; and the bad inputs refused by name."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from conftest import CONF, TINY_DATA, path_overrides
from gradio_client import handle_file
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors import safe_open
from test_demo import QUESTION, client_of, serve, session_bundle, shapes_test_images
from test_train_e2e import run
from torch import nn
from transformers.pytorch_utils import Conv1D

from mmqa.app import build_demo
from mmqa.bundle import WEIGHTS, Bundle
from mmqa.compress.int8 import Int8Linear, quantize_int8, quantize_weight, set_kernel
from mmqa.build import build_lit_module
from mmqa.compress.prune import ffn_layers, hidden_size, prunable, prune, rank_heads, rank_neurons, resize
from mmqa.errors import ConfigError, MMQAError
from mmqa.inspect.capture import attention_modules, attention_site, head_count, stack_of
from mmqa.inspect.heads import head_mask
from mmqa.models.layers import MLP

# |int8 - fp32| <= TOLERANCE * max|fp32| for one layer: 8-bit weights and 7- or 8-bit activations
# give about 1/127 + 1/63 of the largest product in the worst case, far less on average
TOLERANCE = 0.03


def test_weights_are_int8_with_one_scale_per_output_channel():
    w = torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.0, -0.02]])
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and q.tolist() == [[64, -127, 32], [127, 0, -1]]
    assert scale.tolist() == pytest.approx([1.0 / 127, 2.0 / 127])


@pytest.mark.parametrize("kernel", ["fbgemm", "int_mm"])
def test_an_int8_linear_is_within_tolerance_of_fp32(kernel):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(3, 10, 64)  # (B, N, in)
    layer = Int8Linear.from_float(linear, kernel)
    y, ref = layer(x), linear(x)
    assert y.shape == ref.shape == (3, 10, 48)
    err = (y - ref).abs().max() / ref.abs().max()
    assert err < TOLERANCE
    assert err > 0  # it really is int8: not the fp32 product
    exact = x @ layer.dequantized().t() + linear.bias  # the int8 weights with fp32 activations
    assert (y - exact).abs().max() < (ref - exact).abs().max() + TOLERANCE * ref.abs().max()


def test_a_gpt2_conv1d_becomes_the_same_linear():
    torch.manual_seed(0)
    conv = Conv1D(48, 64)  # GPT-2 stores (in, out): y = x W + b
    nn.init.normal_(conv.bias)
    x = torch.randn(5, 64)
    layer = Int8Linear.from_float(conv, "int_mm")
    assert layer.weight.shape == (48, 64)
    assert (layer(x) - conv(x)).abs().max() / conv(x).abs().max() < TOLERANCE


def test_every_linear_of_the_model_is_swapped_and_its_answers_stay_close(tiny_parts):
    cfg, dm, model, lit, batch = tiny_parts()
    model.eval()
    linears = sum(isinstance(m, (nn.Linear, Conv1D)) for m in model.modules())
    with torch.no_grad():
        img = model.encode_images(batch.images)
        ref = model.answer_logits(img, batch.q_img_idx, model.encode_text(batch.q_input_ids, batch.q_attention_mask))[0]
        assert quantize_int8(model) == linears > 20
        assert not any(isinstance(m, (nn.Linear, Conv1D)) for m in model.modules())
        assert all(m.weight.dtype == torch.int8 for m in model.modules() if isinstance(m, Int8Linear))
        img = model.encode_images(batch.images)
        out = model.answer_logits(img, batch.q_img_idx, model.encode_text(batch.q_input_ids, batch.q_attention_mask))[0]
    assert out.shape == ref.shape
    assert (out - ref).abs().max() / ref.abs().max() < 0.1  # errors add up over ~12 layers in a row


def test_an_unknown_kernel_is_refused_by_name(tiny_parts):
    with pytest.raises(ValueError, match=r"kernel='vnni': valid kernels are auto, fbgemm, int_mm"):
        Int8Linear(4, 4, True, "vnni")
    with pytest.raises(ValueError, match=r"kernel='vnni'"):
        set_kernel(nn.Linear(2, 2), "vnni")


def compress_cfg(data_dir, tmp_path, *overrides):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("compress", overrides=[*TINY_DATA, *overrides, *path_overrides(data_dir, tmp_path)])


@pytest.fixture(scope="module")
def int8_bundle(data_dir, tmp_path_factory):
    """(fp32 bundle folder, int8 bundle folder) made through `python -m mmqa compress`."""
    src = data_dir.parent / "demo-cross" / "bundle"
    session_bundle(data_dir)  # trains it once per session if missing
    out = tmp_path_factory.mktemp("compressed") / "bundle-int8"
    proc = run(["-m", "mmqa", "compress", f"bundle={src}", "method=int8", f"out={out}"])
    assert "model.safetensors" in proc.stdout and "x smaller" in proc.stdout
    return src, out


def test_the_int8_bundle_holds_int8_weights_and_loads_exactly(int8_bundle):
    src, out = int8_bundle
    cfg = OmegaConf.load(out / "config.yaml")
    assert [s.method for s in cfg.compression] == ["int8"] and cfg.compression[0].linear_layers > 20
    with safe_open(str(out / WEIGHTS), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    ints = [k for k, d in dtypes.items() if d == "I8"]
    assert len(ints) == cfg.compression[0].linear_layers
    assert all(f"{k}_scale" in dtypes for k in ints)
    # the Linear weights take a quarter of their fp32 bytes (plus one fp32 scale per row)
    fp32 = Bundle.load(src)
    sizes = {n: m.weight.numel() for n, m in fp32.model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    assert sorted(sizes) == sorted(k.removesuffix(".weight") for k in ints)
    bundle = Bundle.load(out)
    layers = [m for m in bundle.model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == len(ints) and all(m.weight.dtype == torch.int8 for m in layers)
    # loading rebuilds the model the compressor wrote: the same int8 tensors, bit for bit
    quantize_int8(fp32.model)
    assert all(torch.equal(a, b) for a, b in zip(fp32.model.state_dict().values(), bundle.model.state_dict().values()))


def test_the_int8_bundle_answers_and_captions_like_the_fp32_one(int8_bundle, data_dir):
    src, out = int8_bundle
    fp32, int8 = Bundle.load(src), Bundle.load(out)
    images = shapes_test_images(data_dir)[:6]
    agree = sum(fp32.answer(im, QUESTION).answer == int8.answer(im, QUESTION).answer for im in images)
    assert agree >= 5
    caption = int8.caption(images[0])
    assert isinstance(caption, str) and caption


def test_evaluate_and_the_demo_take_the_int8_bundle(int8_bundle, data_dir, tmp_path):
    src, out = int8_bundle
    from mmqa.cli.evaluate import evaluate

    with initialize_config_dir(str(CONF), version_base="1.3"):  # in-process: test_train_e2e runs the CLI
        cfg = compose("evaluate", overrides=[f"bundle={out}", *TINY_DATA, *path_overrides(data_dir, tmp_path / "eval")])
    evaluate(cfg)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0 <= metrics["test/vqa_acc"] <= 1 and "test/bleu4" in metrics
    bundle = Bundle.load(out)
    demo = build_demo(bundle)
    client = client_of(serve(demo), tmp_path / "downloads")
    image = shapes_test_images(data_dir)[0]
    try:
        answer, *_ = client.predict(handle_file(image), QUESTION, api_name="/answer")
    finally:
        client.close()
        demo.close()
    assert answer == bundle.answer(image, QUESTION).answer


def test_compressing_an_int8_bundle_again_is_refused_and_writes_nothing(int8_bundle, data_dir, tmp_path):
    from mmqa.cli.compress import compress_bundle

    src, out = int8_bundle
    target = tmp_path / "twice"
    cfg = compress_cfg(data_dir, tmp_path, f"bundle={out}", f"out={target}")
    with pytest.raises(MMQAError, match=r"already compressed with int8 \(config.yaml: compression"):
        compress_bundle(cfg)
    assert not target.exists() and not list(tmp_path.glob(".twice*"))
    cfg = compress_cfg(data_dir, tmp_path, f"bundle={src}", f"out={src}")
    with pytest.raises(ConfigError, match=r"would overwrite the one it is made from"):
        compress_bundle(cfg)
    cfg = compress_cfg(data_dir, tmp_path, f"bundle={src}", "method=zip")
    with pytest.raises(MMQAError, match=r"method='zip' is not a compression method; valid: int8, prune"):
        compress_bundle(cfg)


def test_a_bundle_compressed_by_a_newer_mmqa_is_refused_by_name(int8_bundle, tmp_path):
    import shutil

    src, out = int8_bundle
    newer = tmp_path / "newer"
    shutil.copytree(out, newer)
    cfg = OmegaConf.load(newer / "config.yaml")
    cfg.compression[0].method = "int4"
    OmegaConf.save(cfg, newer / "config.yaml")
    with pytest.raises(MMQAError, match=r"newer/config.yaml: compression\[0\] is method='int4'.*cannot run"):
        Bundle.load(newer)



# ----------------------------------------------------------------------------- structured pruning
def drop_plan(model):
    """Every attention without its head 1, every FFN without its odd neurons."""
    heads, ffns = prunable(model)
    keep_heads = {p: [h for h in range(head_count(model.get_submodule(p))) if h != 1] for p in heads}
    keep_neurons = {p: list(range(0, hidden_size(model.get_submodule(p)), 2)) for p in ffns}
    return keep_heads, keep_neurons


@pytest.mark.parametrize("fusion", ["cross", "anchored", "anchored_sink"])
def test_a_pruned_model_is_smaller_and_computes_what_the_masked_original_does(tiny_parts, fusion):
    sink = fusion == "anchored_sink"
    fusion = fusion.removesuffix("_sink")
    overrides = [f"model/fusion={fusion}"] + (["model.fusion.anchored_heads=2"] if fusion == "anchored" else [])
    overrides += ["model.fusion.sink=true"] if sink else []
    cfg, dm, model, lit, batch = tiny_parts(*overrides)
    lit.eval()
    if fusion == "anchored":  # trained-like: an offset bias, a position read and a sink that are not zero
        torch.manual_seed(0)
        with torch.no_grad():
            for block in model.fusion.text_blocks:
                for layer in (block.cross_attn.gate, block.cross_attn.read) + ((block.cross_attn.sink,) if sink else ()):
                    nn.init.normal_(layer.weight, std=0.3)
    keep_heads, keep_neurons = drop_plan(model)
    assert {stack_of(p) for p in keep_heads} == {stack_of(p) for p in keep_neurons} == {"image", "text", "fusion", "decoder"}
    # the original with the dropped heads' outputs masked (the capture layer's head mask) and the
    # dropped neurons' outgoing weights zeroed
    masked = copy.deepcopy(model)
    for path, keep in keep_neurons.items():
        second = masked.get_submodule(path).get_submodule(ffn_layers(masked.get_submodule(path))[1])
        dropped = [j for j in range(hidden_size(masked.get_submodule(path))) if j not in keep]
        with torch.no_grad():
            if isinstance(second, Conv1D):
                second.weight[dropped] = 0.0
            else:
                second.weight[:, dropped] = 0.0
    sites = {n: attention_site(n, m) for n, m in attention_modules(masked)}
    masks = {sites[p]: torch.tensor([float(h in keep) for h in range(head_count(masked.get_submodule(p)))])
             for p, keep in keep_heads.items()}
    masked_lit = build_lit_module(cfg, masked, dm, train=False).eval()
    with torch.no_grad(), head_mask(masked, masks):
        ref_losses, ref_out = masked_lit.compute_losses(batch)

    before = sum(p.numel() for p in model.parameters())
    sizes = prune(model, keep_heads, keep_neurons)
    with torch.no_grad():
        losses, out = lit.compute_losses(batch)
    torch.testing.assert_close(out["vqa_logits"], ref_out["vqa_logits"], rtol=1e-5, atol=1e-5)
    for key in ("vqa", "caption", "contrastive"):
        torch.testing.assert_close(losses[key], ref_losses[key], rtol=1e-5, atol=1e-6)
    # the matrices themselves are smaller: the fusion's 4 heads of 8 -> 3, GPT-2's 2 heads of 16 -> 1,
    # 4 x 32 FFN neurons -> 64
    attn = model.fusion.text_blocks[0].self_attn
    assert attn.heads == 3 and attn.q.weight.shape == (24, 32) and attn.kv.weight.shape == (48, 32)
    assert attn.out.weight.shape == (32, 24)
    assert model.decoder.gpt2.transformer.h[0].attn.c_attn.weight.shape == (32, 48)  # Conv1D: (in, 3 x 16)
    assert model.text_encoder.model.encoder.layer[0].intermediate.dense.weight.shape == (64, 32)
    assert all(head_count(model.get_submodule(p)) == n == len(keep_heads[p]) for p, n in sizes["heads"].items())
    assert set(sizes["hidden"].values()) == {64}
    assert sum(p.numel() for p in model.parameters()) < 0.85 * before  # embeddings and norms stay
    if fusion == "anchored":  # heads 0, 2, 3 of 4 left, of which head 0 is the one biased
        cross = model.fusion.text_blocks[0].cross_attn
        assert (cross.heads, cross.anchored) == (3, 1) and cross.gate.weight.shape == (6, 32)
        assert cross.anchor.weight.shape == (6, 32) and cross.read.weight.shape == (32, 15 if sink else 12)
        assert sizes["anchored"] == {f"fusion.text_blocks.{i}.cross_attn": 1 for i in range(2)}
        assert (cross.sink.weight.shape == (3, 32)) if sink else cross.sink is None
    # a fresh model resized from the recorded sizes alone has every tensor's shape (Bundle.load's path)
    fresh = tiny_parts(*overrides)[2]
    resize(fresh, sizes)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_heads_are_dropped_least_important_first_and_every_attention_keeps_one():
    scores = {"a": torch.tensor([0.9, 0.1, 0.5]), "b": torch.tensor([0.05, 0.02]), "c": torch.tensor([0.3])}
    stacks = {"a": "x", "b": "x", "c": "y"}
    # stack x has 5 heads: 0.6 of them is 3; b keeps its best head, so a loses its 0.1 and its 0.5
    assert rank_heads(scores, stacks, 0.6) == {"a": [0], "b": [0], "c": [0]}
    assert rank_heads(scores, stacks, 0.0) == {"a": [0, 1, 2], "b": [0, 1], "c": [0]}


def test_ffn_neurons_are_ranked_by_their_weights():
    mlp = MLP(4, 1.0, 0.0)
    with torch.no_grad():
        mlp.net[0].weight.copy_(torch.diag(torch.tensor([1.0, 3.0, 2.0, 0.5])))
        mlp.net[3].weight.fill_(1.0)
    model = nn.Sequential(mlp)
    assert sorted(rank_neurons(model, 0.5)["0"]) == [1, 2]


@pytest.fixture(scope="module")
def pruned_bundle(data_dir, tmp_path_factory, int8_bundle):
    """(fp32 bundle folder, pruned bundle folder, what the fine-tune's text cache saw) through the
    compress tool (in-process; the int8 fixture runs it as a command). The source is the session
    bundle with its text tower frozen, as the pretrained default's is: pruned like the others, then
    fine-tuned around, read through the text cache."""
    import mmqa.cli.compress as cli

    tmp = tmp_path_factory.mktemp("pruned")
    src = tmp / "frozen-text"
    shutil.copytree(int8_bundle[0], src)
    cfg = OmegaConf.load(src / "config.yaml")
    cfg.model.text_encoder.trainable = False
    OmegaConf.save(cfg, src / "config.yaml")
    seen, fill = {}, cli.fill_text_cache

    def spy(model, dm, rows):
        seen.update(model=model, cache=model.text_cache)
        return fill(model, dm, rows)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "fill_text_cache", spy)
        cfg = compress_cfg(data_dir, tmp, f"bundle={src}", "method=prune", "prune.heads=0.5", "prune.ffn=0.5",
                           "finetune.epochs=1", "prune.n=16", f"out={tmp / 'bundle-prune'}")
        return src, cli.compress_bundle(cfg), seen


def test_a_frozen_text_tower_is_pruned_then_read_from_the_cache_while_the_rest_recovers(pruned_bundle):
    src, out, seen = pruned_bundle
    cache = seen["cache"]
    assert len(cache.rows) > 0 and cache.hits > 0  # filled before the fine-tune, then read by it
    assert seen["model"].text_cache is None  # training-time state, dropped when the fine-tune ends
    before, after = Bundle.load(src).model, Bundle.load(out).model
    heads = OmegaConf.load(out / "config.yaml").compression[0].sizes.heads
    assert any(k.startswith("text_encoder.") and v < 2 for k, v in heads.items())  # the frozen tower lost heads
    # its unpruned weights are as loaded (frozen); the fusion, which is not frozen, moved in the fine-tune
    b, a = before.state_dict(), after.state_dict()
    text = [k for k in a if k.startswith("text_encoder.") and a[k].shape == b[k].shape]  # embeddings, norms, ...
    assert text and all(torch.equal(a[k], b[k]) for k in text)
    head = [k for k in a if k.startswith("vqa_head.")]
    assert head and not all(torch.equal(a[k], b[k]) for k in head)


def test_a_pruned_bundle_records_its_sizes_and_loads_at_them(pruned_bundle, data_dir):
    src, out, _ = pruned_bundle
    step = OmegaConf.load(out / "config.yaml").compression[0]
    assert step.method == "prune" and step.finetune_epochs == 1
    bundle = Bundle.load(out)
    params = sum(p.numel() for p in bundle.model.parameters())
    assert params == step.parameters < 0.8 * step.parameters_before
    assert step.parameters_before == sum(p.numel() for p in Bundle.load(src).model.parameters())
    assert all(head_count(bundle.model.get_submodule(p)) == n for p, n in step.sizes.heads.items())
    image = shapes_test_images(data_dir)[0]
    assert bundle.answer(image, QUESTION).answer in bundle.answers and isinstance(bundle.caption(image), str)


def test_a_pruned_bundle_can_then_be_quantized_but_not_the_other_way(pruned_bundle, int8_bundle, data_dir, tmp_path):
    from mmqa.cli.compress import compress_bundle

    src, pruned, _ = pruned_bundle
    both = compress_bundle(compress_cfg(data_dir, tmp_path, f"bundle={pruned}", "method=int8", f"out={tmp_path / 'both'}"))
    assert [s.method for s in OmegaConf.load(both / "config.yaml").compression] == ["prune", "int8"]
    bundle = Bundle.load(both)
    assert any(isinstance(m, Int8Linear) for m in bundle.model.modules())
    assert bundle.answer(shapes_test_images(data_dir)[0], QUESTION).answer in bundle.answers
    _, int8 = int8_bundle
    with pytest.raises(MMQAError, match=r"int8-quantized .* prune needs the float weights"):
        compress_bundle(compress_cfg(data_dir, tmp_path, f"bundle={int8}", "method=prune", f"out={tmp_path / 'no'}"))
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("key", ["heads", "ffn"])
def test_a_pruning_share_outside_0_1_is_refused_by_its_key(int8_bundle, data_dir, tmp_path, key):
    from mmqa.cli.compress import compress_bundle

    src, _ = int8_bundle
    cfg = compress_cfg(data_dir, tmp_path, f"bundle={src}", "method=prune", f"prune.{key}=1.0", f"out={tmp_path / 'p'}")
    with pytest.raises(ConfigError, match=rf"prune.{key}=1.0: a share of the model to remove, in \[0, 1\)"):
        compress_bundle(cfg)
    assert not (tmp_path / "p").exists()


def test_prune_stacks_leaves_the_other_stacks_whole_and_an_unknown_stack_is_refused(int8_bundle, data_dir, tmp_path):
    from mmqa.cli.compress import compress_bundle

    src, _ = int8_bundle
    args = (f"bundle={src}", "method=prune", "prune.heads=0.5", "prune.ffn=0.5", "finetune.epochs=0", "prune.n=16")
    out = compress_bundle(compress_cfg(data_dir, tmp_path, *args, "prune.stacks=[fusion]", f"out={tmp_path / 'p'}"))
    step = OmegaConf.load(out / "config.yaml").compression[0]
    assert list(step.stacks) == ["fusion"]
    assert step.sizes.heads and {stack_of(p) for p in [*step.sizes.heads, *step.sizes.hidden]} == {"fusion"}
    before, after = Bundle.load(src).model.state_dict(), Bundle.load(out).model.state_dict()
    others = [k for k in before if stack_of(k) in ("image", "text", "decoder")]
    assert others and all(torch.equal(before[k], after[k]) for k in others)  # not a weight of them changed
    assert any(before[k].shape != after[k].shape for k in before if stack_of(k) == "fusion")
    with pytest.raises(ConfigError, match=r"prune.stacks=\['vision'\]: name one or more of image, text, fusion, decoder"):
        compress_bundle(compress_cfg(data_dir, tmp_path, *args, "prune.stacks=[vision]", f"out={tmp_path / 'q'}"))
    assert not (tmp_path / "q").exists()
