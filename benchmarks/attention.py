"""Each attention variant alone, as conf/model/attention/ configures it, on this machine's CPU:
forward and forward+backward latency, the attention call's peak memory, and FLOPs, at growing N.

    python benchmarks/attention.py [--lengths 256 1024 4096 8192 16384] [--batch 1] [--heads 8] [--head-dim 64]
                                   [--repeats 3] [--threads 2] [--naive-limit-gib 6] [--out FILE.json]

q, k, v are float32 (batch, heads, N, head_dim) self-attention inputs. The variants are the configs of
conf/model/attention/ with their parameters (`sliding_window` on an image-like sqrt(N) x sqrt(N)
patch grid), plus `eager`, the naive materialised softmax(QK^T/sqrt d) V that the tiled kernel
replaces. Latency: median of `--repeats` timed calls after one warm-up. Peak memory: the rise of the
process's peak resident memory (Linux VmHWM, reset through /proc/self/clear_refs) over its resident
memory before the call: what the call allocates beyond its inputs, outputs included. FLOPs:
`torch.utils.flop_counter` through `mmqa.cost.count_flops`, which also counts SDPA's CPU kernel and
in-place batched matmuls (matmul-like ops: where attention's work is). A naive call whose (B h N N) score matrix would
pass `--naive-limit-gib` twice over is skipped and said so. Prints Markdown tables, then the N at which
each variant's forward overtakes `sdpa`; on a machine with a CUDA GPU, also the Triton tiled forward
against SDPA there (skipped with the reason otherwise).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import statistics
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mmqa.cost import count_flops
from mmqa.models.attention.sliding_window import TokenLayout

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "conf" / "model" / "attention"
LIBC = ctypes.CDLL("libc.so.6")
ORDER = ["eager", "sdpa", "tiled", "sliding_window", "linear"]


def variants() -> dict[str, object]:
    """name -> the configured function (a partial), from conf/model/attention/*.yaml."""
    found = {p.stem: instantiate(OmegaConf.load(p)) for p in CONFIGS.glob("*.yaml")}
    return {name: found[name] for name in ORDER if name in found}


def rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def peak_mib(call) -> float:
    """MiB the call raises the process's resident memory to, above where it stood before."""
    LIBC.malloc_trim(0)  # hand freed heap memory back first, so what the call allocates shows as a rise
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    before = rss_kib("VmRSS")
    call()
    return (rss_kib("VmHWM") - before) / 1024


def run_once(fn, q, k, v, layout, backward: bool):
    if not backward:
        with torch.no_grad():
            return fn(q, k, v, layout=layout)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(qg, kg, vg, layout=layout)
    out.backward(torch.ones_like(out))
    return qg.grad


def measure(fn, q, k, v, layout, backward: bool, repeats: int) -> dict:
    run_once(fn, q, k, v, layout, backward)  # warm-up (kernels, neighbour tables)
    mem = peak_mib(lambda: run_once(fn, q, k, v, layout, backward))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_once(fn, q, k, v, layout, backward)
        times.append(time.perf_counter() - t0)
    flops = count_flops(run_once, fn, q, k, v, layout, backward)
    return {"seconds": statistics.median(times), "peak_mib": mem, "gflops": flops / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 8192, 16384])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--naive-limit-gib", type=float, default=6.0)
    ap.add_argument("--out", type=Path, help="also write the results as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fns = variants()
    rows = []
    for n in args.lengths:
        torch.manual_seed(0)
        q, k, v = torch.randn(3, args.batch, args.heads, n, args.head_dim).unbind(0)  # (B, h, N, d) each
        layout = TokenLayout.patches(n)  # a sqrt(N) x sqrt(N) grid when N is a square, else a 1D band
        score_gib = args.batch * args.heads * n * n * 4 / 2**30
        for name, fn in fns.items():
            for backward in (False, True):
                naive_gib = score_gib * (3 if backward else 2)  # scores and weights, and their gradient
                if name == "eager" and naive_gib > 2 * args.naive_limit_gib:
                    rows.append({"variant": name, "N": n, "backward": backward, "skipped": f"needs ~{naive_gib:.0f} GiB"})
                    continue
                r = measure(fn, q, k, v, layout, backward, args.repeats)
                rows.append({"variant": name, "N": n, "backward": backward, **r})
                print(f"N={n:>6} {name:<15} {'fwd+bwd' if backward else 'fwd':<8} {r['seconds']:.4f} s "
                      f"{r['peak_mib']:9.1f} MiB {r['gflops']:9.2f} GFLOP", flush=True)
    report(rows, args)
    gpu_rows = triton_on_gpu(args)
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                        "gpu_rows": gpu_rows}, indent=2))


def triton_on_gpu(args) -> list[dict]:
    """The Triton tiled forward against SDPA on a CUDA GPU; on a machine without one, says so."""
    if not torch.cuda.is_available():
        print("\ntriton_tiled: skipped (no CUDA GPU here; on CPU it runs only under TRITON_INTERPRET=1, "
              "which is a correctness check in tests/test_attention_kernels.py, not a speed)")
        return []
    from mmqa.models.attention import sdpa, triton_tiled

    rows = []
    print("\n### forward on the GPU (ms)\n\n| N | sdpa | triton_tiled |\n|---|---|---|")
    for n in args.lengths:
        q, k, v = torch.randn(3, args.batch, args.heads, n, args.head_dim, device="cuda").unbind(0)
        ms = {}
        for name, fn in (("sdpa", sdpa), ("triton_tiled", triton_tiled)):
            fn(q, k, v)  # compile and warm up
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(args.repeats):
                start.record()
                fn(q, k, v)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            ms[name] = statistics.median(times)
        rows.append({"N": n, **ms})
        print(f"| {n} | {ms['sdpa']:.3f} | {ms['triton_tiled']:.3f} |")
    return rows


def report(rows: list[dict], args) -> None:
    print(f"\nB={args.batch}, h={args.heads}, d={args.head_dim}, float32, {args.threads} threads; "
          f"median of {args.repeats}\n")
    cell = {(r["variant"], r["N"], r["backward"]): r for r in rows}
    names = list(dict.fromkeys(r["variant"] for r in rows))
    for backward, title in ((False, "forward"), (True, "forward + backward")):
        print(f"### {title}\n")
        print("| variant | " + " | ".join(f"N={n} s / MiB / GFLOP" for n in args.lengths) + " |")
        print("|---|" + "---|" * len(args.lengths))
        for name in names:
            out = []
            for n in args.lengths:
                r = cell[(name, n, backward)]
                out.append(f"skipped ({r['skipped']})" if "skipped" in r else
                           f"{r['seconds']:.4f} / {r['peak_mib']:.0f} / {r['gflops']:.1f}")
            print(f"| {name} | " + " | ".join(out) + " |")
        print()
    print("### forward speed-up over sdpa, and over eager\n")
    print("| variant | " + " | ".join(f"N={n}" for n in args.lengths) + " | overtakes sdpa at |")
    print("|---|" + "---|" * (len(args.lengths) + 1))
    for name in names:
        ratios, first = [], None
        for n in args.lengths:
            r, s, e = cell[(name, n, False)], cell[("sdpa", n, False)], cell.get(("eager", n, False), {})
            if "skipped" in r:
                ratios.append("–")
                continue
            vs_eager = f", {e['seconds'] / r['seconds']:.1f}× eager" if "seconds" in e else ""
            ratios.append(f"{s['seconds'] / r['seconds']:.2f}×{vs_eager}")
            if first is None and r["seconds"] < s["seconds"] and name != "sdpa":
                first = n
        print(f"| {name} | " + " | ".join(ratios) + f" | {first or '–'} |")


if __name__ == "__main__":
    main()
