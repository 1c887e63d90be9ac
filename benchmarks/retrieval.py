"""Retrieval at scale, on this machine's CPU: exact search against faiss indexes over N 512-d unit
vectors (CLIP ViT-B/32's embedding size): build time, latency per query, recall@10 against exact search
and the memory each index adds.

    python benchmarks/retrieval.py [--sizes 10000 100000 1000000] [--gallery clustered|uniform] [--clusters 2000]
                                   [--methods exact flat ivf hnsw] [--nprobe 1 4 16 64] [--ef 16 32 64 128]
                                   [--lists-per-root 1] [--queries 200] [--query-noise 0.5] [--batch 32] [--threads N]

Gallery (seeded): `clustered` (the default) is a mixture of `--clusters` Gaussian clusters on the sphere,
as real image embeddings cluster by what they show: uniform random unit centres, each item its centre
plus isotropic noise of norm `spread` (drawn per cluster, uniformly in [0.5, 1.5]), renormalised, so an
item's cosine to its centre is 0.55 to 0.9. `uniform` is uniform random unit vectors, the worst case for
an IVF index (no structure: its lists cut through every neighbourhood). Queries: `--queries` gallery
items plus noise of norm `--query-noise` (default 0.5: cosine about 0.9 to their item), renormalised.

Methods: `exact`, torch matmul + topk (what `mmqa.image_index.ImageIndex` does up to its
APPROX_THRESHOLD); `flat`, faiss IndexFlatIP (exact, the peer); `ivf`, faiss IVF-Flat built as
`mmqa.image_index.build_faiss_search` builds it (nlist = sqrt(N), k-means on a seeded sample of 64 per
list) at each `--nprobe` and at the nprobe mmqa tunes (the smallest power of two below nlist reaching
recall@10 >= 0.95 on 200 gallery rows as queries; when none does, ImageIndex searches exactly);
`hnsw`, faiss HNSW-Flat as mmqa builds it (M=32, efConstruction=40) at each `--ef` and at the
efSearch mmqa tunes. Build: seconds to build the index, for ivf and hnsw with mmqa's tuning included.
Latency: median ms of one query at batch 1 over `--queries` queries after 10 warm-up ones, and ms per
query at batch `--batch` (median over the batches); "x exact" is exact's batch-1 time over the
method's. Recall@10: the share of each query's exact top 10 that the method returns, averaged.
Memory: the rise of the process's resident memory while the index is built (its copy of the vectors
included; the gallery tensor itself, N x 2 KiB, is not counted). Prints a Markdown table per size.

Memory: the gallery once (2 GB at 1M) plus one index at a time (about as much again) and a (Q, N)
score matrix (0.8 GB at 1M). Time on one core of a 2-core machine: 10k 25 s, 100k about 3.5 min (1.5 of
them building HNSW); 1M an estimated 30 min, 20 of them building HNSW (`--methods exact flat ivf` for ~10).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import re
import statistics
import time
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from mmqa import image_index
from mmqa.image_index import APPROX_THRESHOLD, TUNE_RECALL, build_faiss_search

DIM = 512  # CLIP ViT-B/32's embedding size
K = 10  # recall@10
WARM_UP = 10  # queries run before timing
CHUNK = 100_000  # gallery rows generated and scored at once (bounds the temporaries at 1M)
SPREAD = (0.5, 1.5)  # clustered: the range of the per-cluster noise norm
LIBC = ctypes.CDLL("libc.so.6")


def gallery(n: int, kind: str, clusters: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, DIM) unit gallery vectors and, for `clustered`, each row's cluster (else empty)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.empty(n, DIM)
    if kind == "clustered":
        centres = F.normalize(torch.randn(clusters, DIM, generator=gen), dim=1)  # (C, DIM)
        spread = torch.empty(clusters).uniform_(*SPREAD, generator=gen)  # (C,)
        assign = torch.randint(0, clusters, (n,), generator=gen)  # (N,)
    for start in range(0, n, CHUNK):
        rows = slice(start, min(start + CHUNK, n))
        chunk = torch.randn(rows.stop - start, DIM, generator=gen)  # (c, DIM)
        if kind == "clustered":
            chunk = centres[assign[rows]] + spread[assign[rows], None] * chunk / math.sqrt(DIM)
        x[rows] = F.normalize(chunk, dim=1)
    return x, (assign if kind == "clustered" else torch.empty(0))


def queries_near(x: torch.Tensor, count: int, noise: float, seed: int) -> torch.Tensor:
    """(count, DIM): random gallery rows plus noise of norm `noise`, renormalised."""
    gen = torch.Generator().manual_seed(seed + 1)
    rows = torch.randint(0, x.shape[0], (count,), generator=gen)
    return F.normalize(x[rows] + noise * torch.randn(count, DIM, generator=gen) / math.sqrt(DIM), dim=1)


def exact_top(x: torch.Tensor, q: torch.Tensor, k: int) -> torch.Tensor:
    """(Q, k) ids of the exact top-k, by gallery chunks (no (Q, N) score matrix at 1M)."""
    best_s, best_i = torch.empty(q.shape[0], 0), torch.empty(q.shape[0], 0, dtype=torch.long)
    for start in range(0, x.shape[0], CHUNK):
        s, i = torch.topk(q @ x[start:start + CHUNK].T, min(k, x.shape[0] - start))  # (Q, k)
        best_s, keep = torch.topk(torch.cat([best_s, s], 1), min(k, best_s.shape[1] + s.shape[1]))
        best_i = torch.gather(torch.cat([best_i, i + start], 1), 1, keep)
    return best_i


def recall(found: np.ndarray, truth: torch.Tensor) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t)) / K for f, t in zip(found, truth.tolist())]))


def rss_mib() -> float:
    LIBC.malloc_trim(0)
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def latency_ms(search, q: np.ndarray, batch: int) -> tuple[float, float]:
    """(median ms of one query alone, median ms per query in batches of `batch`)."""
    for i in range(WARM_UP):
        search(q[i % len(q)][None])
    alone = []
    for i in range(len(q)):
        t = time.perf_counter()
        search(q[i][None])
        alone.append(time.perf_counter() - t)
    batched = []
    for start in range(0, len(q) - batch + 1, batch):
        t = time.perf_counter()
        search(q[start:start + batch])
        batched.append((time.perf_counter() - t) / batch)
    return 1000 * statistics.median(alone), 1000 * statistics.median(batched) if batched else float("nan")


def measure_size(n: int, args) -> None:
    t0 = time.perf_counter()
    x, _ = gallery(n, args.gallery, args.clusters, args.seed)  # (N, DIM)
    q = queries_near(x, args.queries, args.query_noise, args.seed)  # (Q, DIM)
    truth = exact_top(x, q, K)  # (Q, K)
    qn = q.numpy()
    what = f"clustered ({args.clusters} clusters)" if args.gallery == "clustered" else "uniform"
    print(f"\n### {n:,} vectors, {what}, {args.queries} queries\n")
    print(f"| method | parameters | build (s) | ms/query, batch 1 | ms/query, batch {args.batch} | "
          f"x exact, batch 1 | recall@{K} | index MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    base = None

    def row(method, params, build: str, search, mem):
        nonlocal base
        one, many = latency_ms(search, qn, args.batch)
        found = search(qn)
        base = base or (one if method.startswith("exact") else None)
        ratio = f"{base / one:.1f}" if base else "-"
        print(f"| {method} | {params} | {build} | {one:.2f} | {many:.2f} | {ratio} | {recall(found, truth):.3f} "
              f"| {mem:,.0f} |", flush=True)

    if "exact" in args.methods:
        row("exact (torch matmul + topk)", "-", "-",
            lambda b: torch.topk(torch.from_numpy(b) @ x.T, K).indices.numpy(), 0)
    if "flat" in args.methods:
        before = rss_mib()
        t = time.perf_counter()
        flat = faiss.IndexFlatIP(DIM)
        flat.add(x.numpy())
        build_s, mem = time.perf_counter() - t, rss_mib() - before
        row("faiss IndexFlatIP", "-", f"{build_s:.1f}", lambda b: flat.search(b, K)[1], mem)
        flat = None  # freed before the next index is built
    if "ivf" in args.methods:
        faiss_rows(x, "ivf", "nprobe", args.nprobe, row)
    if "hnsw" in args.methods:
        faiss_rows(x, "hnsw", "efSearch", args.ef, row)
    print(f"\n{n:,}: {time.perf_counter() - t0:.0f} s for this size", flush=True)


def faiss_rows(x: torch.Tensor, kind: str, name: str, values: list[int], row) -> None:
    """Build `kind` as mmqa does (tuning included) and print a row at each of `values` of its search
    parameter `name` and at mmqa's tuned value; the index is freed on return."""
    gc.collect()
    before = rss_mib()
    built = build_faiss_search(x, kind)
    mem = rss_mib() - before
    index, tuned = built.index, built.params[name]
    fixed = {k: v for k, v in built.params.items() if k != name}
    where = ", ".join(f"{k}={v}" for k, v in fixed.items())
    for value in sorted({v for v in values if kind != "ivf" or v <= fixed["nlist"]} | {tuned}):
        setattr(index if kind == "ivf" else index.hnsw, name, value)
        label = f"faiss {kind}"
        if value == tuned:  # what ImageIndex uses; below the target it searches exactly instead
            label += f", mmqa's tuned {name}" if built.recall >= TUNE_RECALL else (
                f", mmqa's last {name} (below {TUNE_RECALL}: mmqa searches exactly)")
        row(label, f"{where}, {name}={value}", f"{built.build_s:.1f}" if value == tuned else "",
            lambda b: index.search(b, K)[1], mem)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--gallery", choices=["clustered", "uniform"], default="clustered")
    ap.add_argument("--clusters", type=int, default=2000, help="clustered: the number of clusters")
    ap.add_argument("--methods", nargs="+", choices=["exact", "flat", "ivf", "hnsw"],
                    default=["exact", "flat", "ivf", "hnsw"])
    ap.add_argument("--nprobe", type=int, nargs="+", default=[1, 4, 16, 64], help="ivf: lists probed, besides mmqa's")
    ap.add_argument("--ef", type=int, nargs="+", default=[16, 32, 64, 128], help="hnsw: efSearch, besides mmqa's")
    ap.add_argument("--lists-per-root", type=float, default=image_index.IVF_LISTS_PER_ROOT,
                    help="ivf: nlist = this x sqrt(N) (mmqa's IVF_LISTS_PER_ROOT by default)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--query-noise", type=float, default=0.5, help="norm of the noise added to a gallery item")
    ap.add_argument("--batch", type=int, default=32, help="queries per call for the batched latency")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and faiss threads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    image_index.IVF_LISTS_PER_ROOT = args.lists_per_root  # what build_faiss_search reads
    print(f"torch {torch.__version__}, faiss {faiss.__version__}, {args.threads} threads (torch and faiss); "
          f"{DIM}-d float32 unit vectors; ImageIndex searches exactly up to {APPROX_THRESHOLD:,} images, by IVF above")
    for n in args.sizes:
        measure_size(n, args)


if __name__ == "__main__":
    main()
