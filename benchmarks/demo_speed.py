"""Speed of what the demo does, on this machine's CPU: caption generation with and without the KV
cache, and a text query against large galleries.

    python benchmarks/demo_speed.py [--new-tokens 64] [--repeats 3] [--galleries 10000 100000] [--threads N]
                                    [override ...]

Captions: the default model built from the config (any Hydra override may follow; its weights do not
change the speed, so no training is needed), greedy decoding forced to exactly `--new-tokens` new tokens
(`min_new_tokens`), with `use_cache=True` (transformers' KV cache: each step feeds one token) and
`use_cache=False` (each step runs the whole prefix again). The decoder's position table is widened to
fit the prompt plus the new tokens.

Search: random unit embeddings stand in for a gallery of N images (the embedding size is the model's
`embed_dim` and 512, CLIP ViT-B/32's); one query is the model's text tower embedding a sentence plus
`ImageIndex` search for the top 8, by the exact matrix product and by faiss (IndexFlatIP). Latencies
are medians over `--queries` queries. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from mmqa.build import build_experiment
from mmqa.bundle import Bundle
from mmqa.image_index import ImageIndex

ROOT = Path(__file__).resolve().parents[1]
QUERY = "a large red circle left of a small blue square"
TOP_K = 8  # results per query, as the Search tab's default


def default_bundle(new_tokens: int, overrides: list[str]) -> Bundle:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"model.decoder.max_length={new_tokens + 1}", *overrides,
                                          f"paths.root_dir={ROOT}", f"paths.data_dir={ROOT}/data",
                                          "paths.output_dir=/tmp/mmqa-bench"])
    torch.manual_seed(0)
    dm, lit = build_experiment(cfg)
    return Bundle(cfg, lit.model, *dm.tokenizers, dm.answers)


def caption_speed(bundle: Bundle, image: Image.Image, new_tokens: int, use_cache: bool, repeats: int) -> float:
    """Median new tokens per second of one greedy caption of exactly `new_tokens` tokens."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=1, do_sample=False,
                  use_cache=use_cache)
    bundle.caption(image, **kwargs)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        bundle.caption(image, **kwargs)
        times.append(time.perf_counter() - t)
    return new_tokens / statistics.median(times)


def query_latency(bundle: Bundle, n: int, dim: int, use_faiss: bool, queries: int) -> tuple[float, float]:
    """(median ms of the text tower, median ms of the search) for one text query over n images."""
    gen = torch.Generator().manual_seed(n)
    index = ImageIndex([f"img{i}.png" for i in range(n)], torch.randn(n, dim, generator=gen),
                       search="flat" if use_faiss else "exact")
    project = torch.randn(bundle.embed_text([QUERY]).shape[-1], dim, generator=gen)  # (E, dim)
    index.search_text(torch.randn(dim), TOP_K)  # warm-up (builds the faiss index)
    encode, search = [], []
    for _ in range(queries):
        t = time.perf_counter()
        q = bundle.embed_text([QUERY])[0] @ project  # (dim,): the text tower's cost, at this gallery's size
        t1 = time.perf_counter()
        index.search_text(q, TOP_K)
        t2 = time.perf_counter()
        encode.append(t1 - t)
        search.append(t2 - t1)
    return 1000 * statistics.median(encode), 1000 * statistics.median(search)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="captions timed per setting (median)")
    ap.add_argument("--galleries", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=20, help="text queries timed per gallery (median)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = default_bundle(args.new_tokens, args.overrides)
    params = sum(p.numel() for p in bundle.model.decoder.parameters()) / 1e6
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; default model, decoder "
          f"{params:.2f}M parameters, vocabulary {len(bundle.decoder_tokenizer)}\n")

    size = bundle.cfg.data.image_size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    print(f"| caption, greedy, {args.new_tokens} new tokens | tokens/s | ms/token |")
    print("| --- | --- | --- |")
    speeds = {}
    for use_cache in (True, False):
        speeds[use_cache] = caption_speed(bundle, image, args.new_tokens, use_cache, args.repeats)
        print(f"| use_cache={use_cache} | {speeds[use_cache]:.0f} | {1000 / speeds[use_cache]:.1f} |", flush=True)
    print(f"\nKV cache speed-up: {speeds[True] / speeds[False]:.2f}x\n")

    print(f"| gallery | embedding dim | search | text tower (ms) | search top-{TOP_K} (ms) | query total (ms) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n in args.galleries:
        for dim in sorted({bundle.cfg.model.embed_dim, 512}):
            for use_faiss in (False, True):
                encode, search = query_latency(bundle, n, dim, use_faiss, args.queries)
                print(f"| {n:,} | {dim} | {'faiss IndexFlatIP' if use_faiss else 'exact matmul'} | {encode:.2f} | "
                      f"{search:.2f} | {encode + search:.2f} |", flush=True)


if __name__ == "__main__":
    main()
