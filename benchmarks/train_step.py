"""Training-step speed of the default model per fusion variant on this machine's CPU (or GPU).

    python benchmarks/train_step.py [--steps 10] [override ...] [--fusions cross early late]
    python benchmarks/train_step.py --profile [--steps 10] [--fusions cross]   # where a step's time goes

Builds the default config (Hydra overrides go before `--fusions`, which takes every word after it),
takes real batches of the built-in dataset, and times forward + backward + optimizer step over them after one untimed pass over the same
batches; prints a Markdown table. With `--profile`,
`torch.profiler` records the steps with the loading of each batch, and prints the share of wall
time in each phase (loading, losses, backward, optimiser) and the top operators by own CPU time.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from mmqa.build import build_experiment

ROOT = Path(__file__).resolve().parents[1]
FUSIONS = sorted(p.stem for p in (ROOT / "conf" / "model" / "fusion").glob("*.yaml"))


def bench(fusion: str, steps: int, overrides: list[str], profiled: bool = False) -> dict:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"model/fusion={fusion}", *overrides, f"paths.root_dir={ROOT}",
                                          f"paths.data_dir={ROOT}/data", "paths.output_dir=/tmp/mmqa-bench"])
    torch.manual_seed(0)
    dm, lit = build_experiment(cfg)
    lit.train()  # training mode for every loss term
    model = lit.model
    opt = instantiate(cfg.optim)(params=model.parameters())
    times, images, questions = [], 0, 0
    prof = profile(activities=[ProfilerActivity.CPU]) if profiled else None
    # Two passes over the same first batches (a fresh loader repeats the seeded order): the first
    # warms up and fills the frozen text encoder's cache, as every epoch after the first finds it;
    # the second is timed.
    for timed in (False, True):
        batches = iter(dm.loader("train", train=True))
        if timed and prof:
            prof.start()
        for _ in range(steps):
            with record_function("phase: load a batch"):
                batch = next(batches)
            t = time.perf_counter()
            with record_function("phase: losses (forward)"):
                losses, _ = lit.compute_losses(batch)
            with record_function("phase: backward"):
                lit.total_loss(losses).backward()
            with record_function("phase: optimiser"):
                opt.step()
                opt.zero_grad(set_to_none=True)
            if timed:
                times.append(time.perf_counter() - t)
                images += len(batch.images)
                questions += batch.num_questions
    if prof:
        prof.stop()
        print_profile(prof)
    s = sum(times)
    return dict(fusion=fusion, params=sum(p.numel() for p in model.parameters()) / 1e6,
                step_ms=1000 * s / steps, images_s=images / s, questions_s=questions / s,
                rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def print_profile(prof, top: int = 15) -> None:
    """The phases' share of the profiled wall time, then the operators with the most own CPU time."""
    events = prof.key_averages()
    phases = [e for e in events if e.key.startswith("phase: ")]
    total = sum(e.cpu_time_total for e in phases)
    print("| phase | ms per step | share |\n| --- | --- | --- |")
    for e in phases:
        print(f"| {e.key[7:]} | {e.cpu_time_total / 1000 / e.count:.1f} | {e.cpu_time_total / total:.0%} |")
    print()
    print(events.table(sort_by="self_cpu_time_total", row_limit=top))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--fusions", nargs="+", default=["cross", "early", "late"], choices=FUSIONS,
                    help="fusion variants (last on the line: it takes every word after it)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler: phases and top operators")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch of "
          f"{[o for o in args.overrides if 'batch_size' in o] or 'default'} images\n")
    print("| fusion | params (M) | step (ms) | images/s | questions/s | peak RSS (GB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for f in args.fusions:
        r = bench(f, args.steps, args.overrides, args.profile)
        print(f"| {r['fusion']} | {r['params']:.2f} | {r['step_ms']:.0f} | {r['images_s']:.1f} | "
              f"{r['questions_s']:.0f} | {r['rss_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
