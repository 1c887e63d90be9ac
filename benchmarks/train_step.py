"""Training-step speed of the default model per fusion variant on this machine's CPU (or GPU).

    python benchmarks/train_step.py [--steps 10] [--fusions cross early late] [override ...]

Builds the default config (any Hydra override may follow), takes real batches of the built-in
dataset, and times forward + backward + optimizer step; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from mmqa.build import build_experiment

ROOT = Path(__file__).resolve().parents[1]


def bench(fusion: str, steps: int, overrides: list[str]) -> dict:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"model/fusion={fusion}", *overrides, f"paths.root_dir={ROOT}",
                                          f"paths.data_dir={ROOT}/data", "paths.output_dir=/tmp/mmqa-bench"])
    torch.manual_seed(0)
    dm, lit = build_experiment(cfg)
    lit.train()  # training mode for every loss term
    model = lit.model
    opt = instantiate(cfg.optim)(params=model.parameters())
    batches = iter(dm.loader("train", train=True))
    times, images, questions = [], 0, 0
    for i in range(steps + 2):  # two warm-up steps
        batch = next(batches)
        t = time.perf_counter()
        losses, _ = lit.compute_losses(batch)
        lit.total_loss(losses).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t)
            images += len(batch.images)
            questions += batch.num_questions
    s = sum(times)
    return dict(fusion=fusion, params=sum(p.numel() for p in model.parameters()) / 1e6,
                step_ms=1000 * s / steps, images_s=images / s, questions_s=questions / s,
                rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--fusions", nargs="+", default=["cross", "early", "late"])
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch of "
          f"{[o for o in args.overrides if 'batch_size' in o] or 'default'} images\n")
    print("| fusion | params (M) | step (ms) | images/s | questions/s | peak RSS (GB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for f in args.fusions:
        r = bench(f, args.steps, args.overrides)
        print(f"| {r['fusion']} | {r['params']:.2f} | {r['step_ms']:.0f} | {r['images_s']:.1f} | "
              f"{r['questions_s']:.0f} | {r['rss_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
