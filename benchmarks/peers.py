"""mmqa against the model a user would otherwise pick, in one process at the same sizes:
transformers' `VisionEncoderDecoderModel` (a ViT encoder and GPT-2 with cross-attention).

    python benchmarks/peers.py                      # default and base sizes, CPU (CUDA when present)
    python benchmarks/peers.py --sizes base --captions 1 2 4 --repeats 20 --threads 2
    python benchmarks/peers.py --precision bf16     # autocast both models to bfloat16

What is timed (forward + backward + AdamW step, warm-up first, the two models interleaved and the
median of the repeats taken, so a busy machine slows both alike):

- **caption-only training** at 1, 2, ... captions per image: mmqa encodes each image once and
  gathers its tokens for every caption (`img_tokens[c_img_idx]`); VED, as its users feed it, takes
  one (image, caption) row per caption. At one caption per image the work is equal and the ratio is
  per-token speed alone; above it the ratio adds mmqa's encode-once gain.
- **mmqa's full multi-task step** (VQA, contrastive, concepts and captions of a real batch of the
  built-in data) beside VED's caption-only step on the same images and captions.
- **generation**, greedy and beam search, at batch 1 and 32, through each model's `generate`: both
  decode exactly `--new-tokens` tokens (`min_new_tokens`), so tokens/s compare like for like; mmqa
  also with a static KV cache and its decoding step compiled (`cache_implementation="static"`,
  `GPT2Decoder.generate`), whose compile time per shape is listed below the tables.

Same sizes: the ViT is timm's (mmqa) and transformers' `ViTModel` (VED) with one shape and the same
weights (copied), mmqa's convolutional stem off; the GPT-2 decoder is the same transformers class with
the same config and weights; SDPA attention in both. Before timing, the script checks that the two
compute the same function: mmqa's caption loss against VED's when VED's decoder reads mmqa's patch
tokens (VED's own encoder adds its class token to what the decoder reads, the one difference left),
and greedy tokens likewise. FLOPs per caption come from `torch.utils.flop_counter`, peak memory from
the CPU allocator's bytes in use (torch's profiler) or CUDA's allocator, above what the step
starts with (weights and optimiser state), and MFU on
CUDA from `--peak-tflops` (or the device's dense bf16 peak when known).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2LMHeadModel, ViTConfig, ViTModel, VisionEncoderDecoderModel
from transformers.modeling_outputs import BaseModelOutput

from mmqa.build import build_experiment

ROOT = Path(__file__).resolve().parents[1]
# the two sizes: the default model's, and a `base` one (ViT 6x256 @ 128 px / 16, GPT-2 4x256,
# the fitted text tower 2x256 in place of the default's frozen MiniLM, whose width is fixed)
SIZES = {
    "default": [],
    "base": ["model/text_encoder=bert_tiny", "data.image_size=128", "model.dim=256", "model.embed_dim=256",
             "model.image_encoder.patch_size=16", "model.image_encoder.width=256", "model.image_encoder.depth=6",
             "model.image_encoder.stem_strides=[2,2,2,2]",
             "model.text_encoder.width=256", "model.fusion.depth=2",
             "model.decoder.width=256", "model.decoder.depth=4"],
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}  # dense, per the vendors' sheets


def build(size: str, device: str) -> tuple:
    """mmqa's LightningModule at `size` (one real batch of the built-in data beside it) and a VED of
    the same shape and weights."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*SIZES[size], f"paths.root_dir={ROOT}", f"paths.data_dir={ROOT}/data",
                                          "paths.output_dir=/tmp/mmqa-bench"])
    torch.manual_seed(0)
    dm, lit = build_experiment(cfg)
    batch = next(iter(dm.loader("train", train=True)))
    lit.train()
    enc = cfg.model.image_encoder
    # the caption path, stem off: the same ViT as VED's
    plain = copy.deepcopy(lit.model)
    plain.image_encoder = instantiate(enc, stem_channels=None)
    with torch.no_grad():  # the two projections between ViT and GPT-2 become identities, as VED has none
        plain.decoder.context_proj.weight.copy_(torch.eye(plain.decoder.context_proj.out_features))
        plain.decoder.context_proj.bias.zero_()
        plain.image_position.zero_()
        # an untrained GPT-2 repeats its start token: larger random weights make greedy decoding vary
        for p in plain.decoder.gpt2.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.5)
    ved = VisionEncoderDecoderModel(encoder=vit_like(plain.image_encoder.vit, enc), decoder=gpt2_copy(plain))
    ved.config.decoder_start_token_id = plain.decoder.gpt2.config.bos_token_id
    ved.config.pad_token_id = plain.decoder.gpt2.config.pad_token_id
    return lit.to(device), move_data_to_device(batch, device), plain.to(device), ved.to(device)


def vit_like(vit, enc) -> ViTModel:
    """transformers' ViT of the timm ViT's shape, with its weights (fused qkv split into q, k, v)."""
    cfg = ViTConfig(image_size=enc.image_size, patch_size=enc.patch_size, hidden_size=enc.width,
                    num_hidden_layers=enc.depth, num_attention_heads=enc.heads,
                    intermediate_size=int(enc.width * enc.mlp_ratio), hidden_act="gelu", layer_norm_eps=1e-6,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, qkv_bias=True)
    hf = ViTModel._from_config(cfg, attn_implementation="sdpa")
    state = {"embeddings.cls_token": vit.cls_token, "embeddings.position_embeddings": vit.pos_embed,
             "layernorm.weight": vit.norm.weight, "layernorm.bias": vit.norm.bias}
    for s in ("weight", "bias"):
        state[f"embeddings.patch_embeddings.projection.{s}"] = getattr(vit.patch_embed.proj, s)
        for i, blk in enumerate(vit.blocks):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), getattr(blk.attn.qkv, s).chunk(3)):
                state[f"layers.{i}.attention.{name}.{s}"] = part
            for theirs, ours in (("attention.o_proj", blk.attn.proj), ("layernorm_before", blk.norm1),
                                 ("layernorm_after", blk.norm2), ("mlp.fc1", blk.mlp.fc1), ("mlp.fc2", blk.mlp.fc2)):
                state[f"layers.{i}.{theirs}.{s}"] = getattr(ours, s)
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    assert not unexpected and all(k.startswith("pooler.") for k in missing), (missing, unexpected)
    return hf


def gpt2_copy(model) -> GPT2LMHeadModel:
    gpt2 = model.decoder.gpt2
    twin = GPT2LMHeadModel._from_config(copy.deepcopy(gpt2.config), attn_implementation="sdpa")
    twin.config.is_decoder = True  # VED asks its decoder to say so
    twin.load_state_dict(gpt2.state_dict())
    return twin


def captions(n_images: int, k: int, length: int, vocab: int, device: str) -> tuple:
    """k random captions of `length` tokens per image; ids, mask, mmqa's labels and VED's (shifted)."""
    g = torch.Generator().manual_seed(k)
    ids = torch.randint(3, vocab, (n_images * k, length), generator=g).to(device)  # (C, L), no padding
    mask = torch.ones_like(ids)
    shifted = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)  # VED's CE does not shift
    img_idx = torch.arange(n_images, device=device).repeat_interleave(k)  # (C,)
    return ids, mask, shifted, img_idx


def mmqa_caption_loss(model, images, ids, mask, img_idx) -> torch.Tensor:
    img = model.encode_images(images)  # (B, N, D), each image once
    return model.lm_loss(img, img_idx, ids, mask, ids)


def ved_caption_loss(ved, images, ids, mask, shifted, img_idx) -> torch.Tensor:
    return ved(pixel_values=images[img_idx], decoder_input_ids=ids, decoder_attention_mask=mask, labels=shifted).loss


class Timer:
    """Trains or runs contenders in turn, `repeats` times after `warmup`, and keeps each one's times."""

    def __init__(self, device: str, precision: str):
        self.device, self.precision = device, precision

    def autocast(self):
        return torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def interleaved(self, fns: dict[str, Callable[[], None]], warmup: int, repeats: int) -> dict[str, float]:
        times = {k: [] for k in fns}
        for i in range(warmup + repeats):
            for k, fn in fns.items():
                self.sync()
                t = time.perf_counter()
                with self.autocast():
                    fn()
                self.sync()
                if i >= warmup:
                    times[k].append(time.perf_counter() - t)
        return {k: statistics.median(v) for k, v in times.items()}

    def train_step(self, model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn().backward()
            opt.step()
        return step

    def flops(self, fn: Callable[[], torch.Tensor]) -> float:
        with FlopCounterMode(display=False) as counter, self.autocast():
            fn().backward()
        return counter.get_total_flops()

    def peak_mb(self, fn: Callable[[], None]) -> float:
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            return (torch.cuda.max_memory_allocated() - base) / 2**20
        # the CPU allocator's bytes in use, summed over the profiler's allocation records in time order
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
        in_use = peak = 0
        for e in events:
            in_use += e.nbytes()
            peak = max(peak, in_use)
        return peak / 2**20


def peak_tflops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if args.device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return None


def check_same_function(plain, ved, images, ids, mask, shifted, img_idx) -> str:
    """Step-0 losses and the ViT's tokens: the two models compute one function apart from VED's class token."""
    with torch.no_grad():
        tokens = plain.image_encoder(images).tokens  # (B, N, D) timm's patch tokens
        hf = ved.encoder(pixel_values=images).last_hidden_state  # (B, 1 + N, D)
        vit_diff = (hf[:, 1:] - tokens).abs().max().item()
        m = mmqa_caption_loss(plain, images, ids, mask, img_idx).item()
        own = ved_caption_loss(ved, images, ids, mask, shifted, img_idx).item()
        read = ved(encoder_outputs=BaseModelOutput(last_hidden_state=tokens[img_idx]), decoder_input_ids=ids,
                   decoder_attention_mask=mask, labels=shifted).loss.item()
    return (f"step-0 caption loss: mmqa {m:.6f}, VED reading mmqa's patch tokens {read:.6f} "
            f"(|diff| {abs(m - read):.1e}), VED with its class token {own:.6f}; "
            f"ViT patch tokens max |diff| {vit_diff:.1e}")


def run_size(size: str, args, timer: Timer, rows: list, gen_rows: list, notes: list) -> None:
    lit, batch, plain, ved = build(size, args.device)
    images = torch.randn(args.images, *batch.images.shape[1:], device=args.device)
    vocab = plain.decoder.gpt2.config.vocab_size
    ids, mask, shifted, img_idx = captions(args.images, 1, args.length, vocab, args.device)
    notes.append(f"{size}: {check_same_function(plain, ved, images, ids, mask, shifted, img_idx)}")
    peak = peak_tflops(args)

    def add_row(what, k, name, model, loss_fn, seconds, samples):
        flops = timer.flops(loss_fn) / samples
        step = timer.train_step(model, loss_fn)
        step()  # AdamW's state exists before the measured step, as in training
        mem = timer.peak_mb(step)
        rows.append(dict(size=size, what=what, k=k, name=name, samples_s=samples / seconds, ms=1000 * seconds,
                         gflops=flops / 1e9, mem=mem, mfu=flops * samples / seconds / (peak * 1e12) if peak else None))

    plain.eval(), ved.eval()  # generation first, on the weights both models share
    bos = plain.decoder.gpt2.config.bos_token_id
    for n in args.gen_batches:
        imgs = images[:n]
        for beams in (1, args.beams):
            kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, num_beams=beams, do_sample=False)
            prompt = torch.full((n, 1), bos, device=args.device)
            out = {}

            def gen_mmqa():
                with torch.no_grad():
                    out["mmqa"] = plain.generate(plain.encode_images(imgs), prompt, **kw)

            def gen_ved():
                with torch.no_grad():
                    out["VED"] = ved.generate(pixel_values=imgs, **kw)
            def gen_static():
                with torch.no_grad():
                    out["static"] = plain.generate(plain.encode_images(imgs), prompt, cache_implementation="static", **kw)
            fns = {"mmqa": gen_mmqa, "mmqa, static cache, compiled": gen_static, "VED": gen_ved}
            if not args.compiled_decoding:
                del fns["mmqa, static cache, compiled"]
            else:
                start = time.perf_counter()
                gen_static()  # compiles this shape's decoding step (transformers' static-cache path)
                notes.append(f"{size}: compiling the decoding step at batch {n}, {beams} beams: {time.perf_counter() - start:.0f} s")
            t = timer.interleaved(fns, 1, args.gen_repeats)
            same = ""
            if beams == 1:  # VED fed mmqa's patch tokens must decode the same tokens
                with torch.no_grad():
                    read = ved.generate(encoder_outputs=BaseModelOutput(last_hidden_state=plain.image_encoder(imgs).tokens.contiguous()),
                                        **kw)
                same = "yes" if torch.equal(read, out["mmqa"]) and torch.equal(out.get("static", read), read) else "NO"
            for name in fns:
                gen_rows.append(dict(size=size, batch=n, beams=beams, name=name,
                                     tok_s=n * args.new_tokens / t[name], ms=1000 * t[name], same=same))

    plain.train(), ved.train()

    for k in args.captions:
        ids, mask, shifted, img_idx = captions(args.images, k, args.length, vocab, args.device)
        fm = lambda: mmqa_caption_loss(plain, images, ids, mask, img_idx)  # noqa: E731
        fv = lambda: ved_caption_loss(ved, images, ids, mask, shifted, img_idx)  # noqa: E731
        t = timer.interleaved({"mmqa": timer.train_step(plain, fm), "VED": timer.train_step(ved, fv)},
                              args.warmup, args.repeats)
        add_row("caption-only train step", k, "mmqa", plain, fm, t["mmqa"], len(img_idx))
        add_row("caption-only train step", k, "VED", ved, fv, t["VED"], len(img_idx))

    # the full multi-task step on a real batch, beside VED's caption step on the same images and captions
    def full():
        losses, _ = lit.compute_losses(batch)
        return lit.total_loss(losses)
    fv = lambda: ved(pixel_values=batch.images[batch.c_img_idx], decoder_input_ids=batch.c_dec_input_ids,  # noqa: E731
                     decoder_attention_mask=batch.c_dec_attention_mask,
                     labels=torch.cat([batch.c_dec_labels[:, 1:], torch.full_like(batch.c_dec_labels[:, :1], -100)], 1)).loss
    t = timer.interleaved({"mmqa": timer.train_step(lit.model, full), "VED": timer.train_step(ved, fv)},
                          args.warmup, args.repeats)
    what = f"full step (mmqa: {batch.num_questions} questions + {batch.num_captions} captions; VED: the captions)"
    add_row(what, batch.num_captions / len(batch.images), "mmqa", lit.model, full, t["mmqa"], batch.num_captions)
    add_row(what, batch.num_captions / len(batch.images), "VED", ved, fv, t["VED"], batch.num_captions)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--captions", nargs="+", type=int, default=[1, 2], help="captions per image in the caption-only step")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--length", type=int, default=16, help="caption tokens")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--gen-batches", nargs="*", type=int, default=[1, 32], help="none: no generation")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--gen-repeats", type=int, default=5)
    ap.add_argument("--no-compiled-decoding", dest="compiled_decoding", action="store_false",
                    help="leave out mmqa's static-cache compiled decoding (a compile per batch size and beam count)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--peak-tflops", type=float, default=None, help="for MFU; default: the CUDA device's bf16 peak when known")
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()  # VED's generate warns about a mask its inputs do not need
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or 'CPU'}, {os.cpu_count()} cores"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.device} ({where}), "
          f"{torch.get_num_threads()} threads, {args.precision}; {args.images} images, captions of {args.length} tokens, "
          f"median of {args.repeats} after {args.warmup} warm-up\n")
    timer, rows, gen_rows, notes = Timer(args.device, args.precision), [], [], []
    for size in args.sizes:
        run_size(size, args, timer, rows, gen_rows, notes)
    print("| size | step | captions / image | model | captions/s | ms / step | GFLOPs / caption | peak memory (MB) | MFU | mmqa / VED |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for i, r in enumerate(rows):
        ratio = f"**{r['samples_s'] / rows[i + 1]['samples_s']:.2f}x**" if r["name"] == "mmqa" else ""
        mfu = f"{r['mfu']:.2f}" if r["mfu"] is not None else "-"
        print(f"| {r['size']} | {r['what']} | {r['k']:g} | {r['name']} | {r['samples_s']:.0f} | {r['ms']:.0f} | "
              f"{r['gflops']:.3f} | {r['mem']:.0f} | {mfu} | {ratio} |")
    print(f"\n| size | generation, {args.new_tokens} new tokens | batch | model | tokens/s | ms | greedy tokens equal | mmqa / VED |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in gen_rows:
        ved = next(v for v in gen_rows if v["name"] == "VED" and (v["size"], v["batch"], v["beams"]) == (r["size"], r["batch"], r["beams"]))
        ratio = f"**{r['tok_s'] / ved['tok_s']:.2f}x**" if r["name"] != "VED" else ""
        how = "greedy" if r["beams"] == 1 else f"beam {r['beams']}"
        print(f"| {r['size']} | {how} | {r['batch']} | {r['name']} | {r['tok_s']:.0f} | {r['ms']:.0f} | {r['same']} | {ratio} |")
    print()
    for n in notes:
        print(f"- {n}")


if __name__ == "__main__":
    main()
