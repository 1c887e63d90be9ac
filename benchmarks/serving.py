"""What serving a bundle costs, for several bundles side by side (FP32 and its compressed copies):

    python benchmarks/serving.py --bundles <run>/bundle <run>/bundle-int8 [--repeats 7] [--threads 2]
                                 [--kernels fbgemm int_mm] [--static-cache] [--parts] [--evaluate] [--split test]

Per bundle: the weights file's size, the parameters (int8 weights counted like any), the bytes of the
Linear weights, and the median latency of `Bundle.answer_batch` (question + image -> answer) and of
`Bundle.caption_batch` (greedy, KV cache, exactly `--new-tokens` new tokens) at batch 1 and 32, each
after a warm-up, on `--threads` threads. `--kernels` times an int8 bundle once per INT8 kernel
(mmqa/compress/int8.py). `--static-cache` also times captions with transformers' static cache and
the compiled decoding step (`generation.cache_implementation=static`, what `demo.py --static-cache`
serves; compiled once per batch size in the warm-up). `--parts` splits a batch-1 caption's time into
the image, the decoder's forward passes and `generate`'s bookkeeping. `--evaluate` adds test VQA,
BLEU-4 and R@1 from `python -m mmqa evaluate`'s own code on the built-in data. Prints one Markdown
table; ratios are against the first bundle.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from torch import nn
from transformers.pytorch_utils import Conv1D

from mmqa.bundle import WEIGHTS, Bundle
from mmqa.compress import steps_of
from mmqa.compress.int8 import Int8Linear, set_kernel

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "what colour is the circle?"


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def sizes(bundle: Bundle, path: Path) -> dict:
    """Parameters (an int8 layer's weight and bias count like an fp32 one's) and bytes."""
    int8 = [m for m in bundle.model.modules() if isinstance(m, Int8Linear)]
    params = sum(p.numel() for p in bundle.model.parameters())
    params += sum(m.weight.numel() + (m.out_features if m.bias is not None else 0) for m in int8)
    linear = sum(m.weight.numel() * m.weight.element_size() + (4 * m.out_features if isinstance(m, Int8Linear) else 0)
                 for m in bundle.model.modules() if isinstance(m, (nn.Linear, Conv1D, Int8Linear)))
    return {"file_mb": (path / WEIGHTS).stat().st_size / 1e6, "params_m": params / 1e6, "linear_mb": linear / 1e6}


def latencies(bundle: Bundle, images: list[Image.Image], new_tokens: int, repeats: int, static: bool) -> dict:
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=1, do_sample=False, use_cache=True)
    out = {}
    for b in (1, 32):
        ims = images[:b]
        out[f"answer_b{b}"] = median_ms(lambda: bundle.answer_batch(ims, [QUESTION] * b), repeats)
        out[f"caption_b{b}"] = median_ms(lambda: bundle.caption_batch(ims, **gen), repeats)
        if static:
            out[f"static_b{b}"] = median_ms(lambda: bundle.caption_batch(ims, cache_implementation="static", **gen),
                                            repeats)
    return out


@torch.no_grad()
def caption_parts(bundle: Bundle, image: Image.Image, new_tokens: int, repeats: int) -> dict:
    """Where a batch-1 caption's time goes: preparing and encoding the image, the decoder's own forward
    passes (the prompt, then one token at a time through the KV cache: what any decoding loop pays),
    and the rest, which is `generate`'s own bookkeeping (logits processors, stopping checks, cache
    and input handling) and the tokenizer."""
    model, dec = bundle.model, bundle.model.decoder
    pixels = bundle._images([image])
    img = model.encode_images(pixels)
    context = dec.context_proj(img.tokens)
    bos = torch.tensor([[dec.gpt2.config.bos_token_id]])

    def forwards():
        out = dec.gpt2(input_ids=bos, encoder_hidden_states=context, use_cache=True)
        for _ in range(new_tokens - 1):
            nxt = out.logits[:, -1:].argmax(-1)
            out = dec.gpt2(input_ids=nxt, encoder_hidden_states=context, past_key_values=out.past_key_values,
                           use_cache=True)

    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=1, do_sample=False, use_cache=True)
    whole = median_ms(lambda: bundle.caption_batch([image], **gen), repeats)
    encode = median_ms(lambda: model.encode_images(bundle._images([image])), repeats)
    steps = median_ms(forwards, repeats)
    return {"whole": whole, "image": encode, "decoder": steps, "rest": whole - encode - steps}


def quality(path: Path, split: str) -> dict:
    from mmqa.cli.evaluate import evaluate

    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"bundle={path}", f"split={split}", f"paths.root_dir={ROOT}",
                                             f"paths.data_dir={ROOT}/data", f"paths.output_dir={tmp}",
                                             "+trainer.enable_progress_bar=false"])
        m = evaluate(cfg)
    return {"vqa": m[f"{split}/vqa_acc"], "bleu4": m[f"{split}/bleu4"], "r1": m[f"{split}/r1_t2i"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", nargs="+", required=True, type=Path)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kernels", nargs="*", default=[], help="int8 bundles: time each of these kernels too")
    ap.add_argument("--static-cache", action="store_true", help="also time captions with the compiled static cache")
    ap.add_argument("--parts", action="store_true", help="also split a batch-1 caption's time into its parts")
    ap.add_argument("--evaluate", action="store_true", help="add test VQA, BLEU-4 and R@1 (evaluate)")
    ap.add_argument("--split", default="test")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; median of {args.repeats} after a warm-up\n")

    rows, parts = [], []
    for path in args.bundles:
        bundle = Bundle.load(path)
        size = bundle.cfg.data.image_size
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(32)]
        steps = "+".join(s.method for s in steps_of(bundle.cfg)) or "fp32"
        has_int8 = any(isinstance(m, Int8Linear) for m in bundle.model.modules())
        kernels = (args.kernels or ["auto"]) if has_int8 else [None]
        scores = quality(path, args.split) if args.evaluate else {}
        for kernel in kernels:
            if kernel:
                set_kernel(bundle.model, kernel)
            torch._dynamo.reset()  # compile each bundle afresh: earlier bundles' graphs count toward the recompile limit
            name = f"{path.parent.name}/{path.name} ({steps}{', ' + kernel if kernel and kernel != 'auto' else ''})"
            times = latencies(bundle, images, args.new_tokens, args.repeats, args.static_cache)
            rows.append({"name": name, **sizes(bundle, path), **times, **scores})
            if args.parts:
                parts.append((name, caption_parts(bundle, images[0], args.new_tokens, args.repeats)))
            print(f"measured {name}", flush=True)

    base = rows[0]
    cols = ["answer_b1", "answer_b32", "caption_b1", "caption_b32"]
    cols += ["static_b1", "static_b32"] if args.static_cache else []
    head = ("| bundle | file MB | params M | Linear MB | " + " | ".join(f"{c} ms" for c in cols)
            + (" | test VQA | BLEU-4 | R@1 t→i" if args.evaluate else "") + " |")
    print("\n" + head)
    print("|" + " --- |" * (head.count("|") - 1))
    for r in rows:
        cells = [f"{r['file_mb']:.2f}", f"{r['params_m']:.3f}", f"{r['linear_mb']:.2f}"]
        # a static-cache caption is compared with the first bundle's ordinary caption: the whole gain
        cells += [f"{r[c]:.1f} ({base[c.replace('static', 'caption')] / r[c]:.2f}x)" for c in cols]
        if args.evaluate:
            cells += [f"{r['vqa']:.3f}", f"{r['bleu4']:.3f}", f"{r['r1']:.3f}"]
        print(f"| {r['name']} | " + " | ".join(cells) + " |")
    if parts:
        print("\n| bundle | caption b1 ms | image ms | decoder forward passes ms | generate's bookkeeping ms |")
        print("| --- | --- | --- | --- | --- |")
        for name, p in parts:
            print(f"| {name} | {p['whole']:.1f} | {p['image']:.1f} | {p['decoder']:.1f} | {p['rest']:.1f} "
                  f"({p['rest'] / p['whole']:.0%}) |")


if __name__ == "__main__":
    main()
