"""The training data loader against the training step, on real-format data: a JSONL dataset
(data/README.md) of PNG or JPEG images at 64 or 224 px, with 0, 1 and 2 loader workers.

    python benchmarks/loader.py [--batches 8] [--images 0] [--sizes 64 224] [--formats png jpeg]
                                [--workers 0 1 2] [--steps 3] [--loop-steps 2] [--threads N] [--root DIR]
                                [override ...]

Writes one dataset per (format, size) under `--root` (a temporary folder by default): scenes of the
built-in shapes world drawn at that size (a third on a noisy background, which compresses like a
photo, not like a flat colour), saved as PNG or as JPEG (quality 90), each image with a few questions
and captions. Each is read through the real config (`data=jsonl data.root=<dir>
data.image_size=<size> data.num_workers=<w>`, any Hydra override may follow), so reader, validation,
tokenizers, collation and `MMQADataModule.loader` are the ones training uses. At 224 px the
image encoder's patch is 16 (`PATCH`): the default patch of 8 would give 784 tokens per image.

Three measurements per (format, size, workers), each after warm-up, on a fresh loader:
- loader alone: images/s of iterating the training loader; its start-up (the first batch, worker
  processes included) is reported apart;
- the step alone (per size, on the first format's batches): forward + backward + optimiser step on
  batches taken from the loader beforehand, as benchmarks/train_step.py does (the median step);
  `loader/step` is loader images/s over step images/s;
- the training loop: next(batch), then the step, in the main process; `loop wait` is the share of
  the loop's time spent waiting for a batch. On a machine with few cores the workers take CPU from
  the step's threads, which the loader alone does not show: `loop step` against `step alone` does.

A second table gives CPU time rather than wall time, which other processes on the machine hardly
change: a batch made with one torch thread (as a worker makes it) against a step.

Prints two Markdown tables, the torch version, its threads, the machine's cores and load average.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from mmqa.build import build_experiment
from mmqa.data.datamodule import MMQADataModule
from mmqa.data.worlds.shapes import ask_questions, make_captions, render_scene, sample_scene

ROOT = Path(__file__).resolve().parents[1]
SUFFIX = {"png": ".png", "jpeg": ".jpg"}
PATCH = {64: ["model.image_encoder.patch_size=8", "model.image_encoder.stem_strides=[2,2,2,1]"],
         224: ["model.image_encoder.patch_size=16", "model.image_encoder.stem_strides=[2,2,2,2]"]}
WARMUP = 2  # batches of the loader alone, and steps of the step alone, before timing starts
LOOP_WARMUP = 1  # steps of the training loop before timing starts (the model is warm by then)


def write_dataset(out: str | Path, n_images: int, image_size: int, fmt: str, n_val: int = 8,
                  questions: int = 3, captions: int = 2, seed: int = 0) -> Path:
    """A JSONL dataset (data/README.md) in `out`: `n_images` training and `n_val` validation shapes
    scenes drawn at `image_size` px and saved as `fmt` ('png' or 'jpeg'), each with up to `questions`
    questions and `captions` captions (captions on the image's first line). The same seed draws the
    same scenes and text in every format. Returns `out`."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    families: Counter = Counter()
    for split, n in (("train", n_images), ("val", n_val)):
        with open(out / f"{split}.jsonl", "w") as f:
            for i in range(n):
                scene = sample_scene(rng, image_size, 1, 5)
                image = f"images/{split}_{i:06d}{SUFFIX[fmt]}"
                img = render_scene(scene, image_size, np_rng)
                img.save(out / image, **({"quality": 90} if fmt == "jpeg" else {}))
                lines = [{"image": image, "captions": make_captions(scene, captions, rng)}]
                lines += [{"image": image, "question": q.question, "answers": [q.answer], "question_type": q.family}
                          for q in ask_questions(scene, questions, image_size, rng, families)]
                f.writelines(json.dumps(line) + "\n" for line in lines)
    return out


def config(data_root: Path, size: int, workers: int, overrides: list[str]):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[
            "data=jsonl", f"data.root={data_root}", f"data.image_size={size}", f"data.num_workers={workers}",
            *PATCH[size], *overrides,
            f"paths.root_dir={ROOT}", f"paths.data_dir={ROOT}/data", "paths.output_dir=/tmp/mmqa-bench"])


def datamodule(cfg, like: MMQADataModule) -> MMQADataModule:
    """The data module of `cfg` with `like`'s tokenizers and vocabularies (one model per size)."""
    dm = instantiate(cfg.data)
    dm.load_records()
    dm.attach(*like.tokenizers, like.answers, like.ingredients, like.concepts,
              normalization=(like.transform.mean, like.transform.std))
    return dm


class Stepper:
    """Forward + backward + optimiser step of the LightningModule's losses on one batch."""

    def __init__(self, cfg, lit):
        torch.manual_seed(0)
        self.lit = lit
        lit.train()  # training mode for every loss term
        self.opt = instantiate(cfg.optim)(params=lit.model.parameters())

    def __call__(self, batch) -> None:
        losses, _ = self.lit.compute_losses(batch)
        self.lit.total_loss(losses).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def close(batches) -> None:
    """Stop a loader iterator's worker processes now, so that they take no CPU from the next measurement."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    gc.collect()


def time_loader(dm: MMQADataModule, n: int) -> dict:
    """Start-up (the first batch) in seconds, then images/s over `n` batches after warm-up."""
    t = time.perf_counter()
    batches = iter(dm.loader("train", train=True))
    next(batches)
    startup = time.perf_counter() - t
    for _ in range(WARMUP - 1):
        next(batches)
    images = 0
    t = time.perf_counter()
    for _ in range(n):
        images += len(next(batches).images)
    s = time.perf_counter() - t
    close(batches)
    return dict(startup_s=startup, images_s=images / s)


def batch_cpu(dm: MMQADataModule, n: int) -> float:
    """CPU ms to make one batch, in this process with one torch thread as a loader worker runs
    (`dm` has no workers): what a batch costs whoever makes it, whatever else the machine runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    batches = iter(dm.loader("train", train=True))
    next(batches)
    t = time.process_time()
    for _ in range(n):
        next(batches)
    cpu = time.process_time() - t
    torch.set_num_threads(threads)
    return 1000 * cpu / n


def time_steps(step: Stepper, batches: list) -> dict:
    """The step alone on batches already in memory, after warm-up: the median step's ms and images/s
    (the median, as a step now and then waits for cores that other processes hold), and the CPU ms
    of a step (every torch thread of this process)."""
    for b in batches[:WARMUP]:
        step(b)
    times, cpu = [], time.process_time()
    for b in batches[WARMUP:]:
        t = time.perf_counter()
        step(b)
        times.append(time.perf_counter() - t)
    cpu = time.process_time() - cpu
    s = statistics.median(times)
    return dict(step_ms=1000 * s, images_s=len(batches[WARMUP].images) / s, cpu_ms=1000 * cpu / len(times))


def time_loop(dm: MMQADataModule, step: Stepper, n: int) -> dict:
    """The training loop (next batch, then step) over `n` steps after warm-up (worker start-up
    included): the share of its time spent waiting for batches, the step's own ms, and images/s of
    the whole loop."""
    batches = iter(dm.loader("train", train=True))
    for _ in range(LOOP_WARMUP):
        step(next(batches))
    wait = busy = 0.0
    images = 0
    for _ in range(n):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        step(batch)
        t2 = time.perf_counter()
        wait, busy, images = wait + t1 - t0, busy + t2 - t1, images + len(batch.images)
    close(batches)
    return dict(wait=wait / (wait + busy), step_ms=1000 * busy / n, images_s=images / (wait + busy))


def bench_size(root: Path, size: int, formats: list[str], workers: list[int], n: int, steps: int,
               loop_steps: int, overrides: list[str]) -> tuple[list[dict], list[dict]]:
    """Every format and worker count at one image size, with one model: (a row per format and
    worker count, printed as it comes; a row of CPU costs per format)."""
    cfg = config(root / f"{formats[0]}-{size}", size, 0, overrides)
    torch.manual_seed(0)
    like, lit = build_experiment(cfg)
    step = Stepper(cfg, lit)
    alone = time_steps(step, [b for _, b in zip(range(steps + WARMUP), like.loader("train", train=True))])
    rows, costs = [], []
    for fmt in formats:
        cpu = batch_cpu(datamodule(config(root / f"{fmt}-{size}", size, 0, overrides), like), n)
        costs.append(dict(fmt=fmt, size=size, batch_cpu_ms=cpu, alone=alone))
        for w in workers:
            dm = datamodule(config(root / f"{fmt}-{size}", size, w, overrides), like)
            rows.append(dict(fmt=fmt, size=size, workers=w, load=time_loader(dm, n), alone=alone,
                             loop=time_loop(dm, step, loop_steps)))
            load, loop = rows[-1]["load"], rows[-1]["loop"]
            print(f"| {fmt} | {size} | {w} | {load['startup_s']:.2f} | {load['images_s']:.0f} | "
                  f"{alone['images_s']:.1f} | {load['images_s'] / alone['images_s']:.1f} | {alone['step_ms']:.0f} | "
                  f"{loop['step_ms']:.0f} | {100 * loop['wait']:.0f}% | {loop['images_s']:.1f} |", flush=True)
    return rows, costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=8, help="timed batches of the loader alone")
    ap.add_argument("--steps", type=int, default=3, help="timed steps of the step alone")
    ap.add_argument("--loop-steps", type=int, default=2, help="timed steps of the training loop")
    ap.add_argument("--images", type=int, default=0,
                    help="training images per dataset; 0: enough for one epoch of warm-up + timed batches")
    ap.add_argument("--sizes", nargs="+", type=int, default=[64, 224], choices=sorted(PATCH))
    ap.add_argument("--formats", nargs="+", default=["png", "jpeg"], choices=sorted(SUFFIX))
    ap.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--threads", type=int, help="torch threads of the main process (default: torch's own); "
                    "loader workers always run one")
    ap.add_argument("--root", help="where the datasets are written (kept); default: a temporary folder")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_size = next((int(o.split("=")[1]) for o in args.overrides if o.startswith("data.batch_size=")), 32)
    # one epoch holds every timed batch, so no epoch boundary (and its refill of the workers) is timed
    n_images = args.images or batch_size * (args.batches + WARMUP)
    with tempfile.TemporaryDirectory(prefix="mmqa-loader-") as tmp:
        root = Path(args.root or tmp)
        t = time.perf_counter()
        for fmt in args.formats:
            for size in args.sizes:
                write_dataset(root / f"{fmt}-{size}", n_images, size, fmt)
        mb = {f"{fmt}-{size}": sum(p.stat().st_size for p in (root / f"{fmt}-{size}" / "images").iterdir()) / 2**20
              for fmt in args.formats for size in args.sizes}
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, load average "
              f"{os.getloadavg()[0]:.1f}; batch of {batch_size} images; {n_images} training images per dataset, "
              f"written in {time.perf_counter() - t:.0f} s ({', '.join(f'{k}: {v:.1f} MB' for k, v in mb.items())}); "
              f"{args.batches} timed batches after {WARMUP} of warm-up\n")
        print("| format | px | workers | start-up (s) | loader images/s | step images/s | loader/step | "
              "step alone (ms) | loop step (ms) | loop wait | loop images/s |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        costs = []
        for size in args.sizes:
            costs += bench_size(root, size, args.formats, args.workers, args.batches, args.steps, args.loop_steps,
                                args.overrides)[1]
        print(f"\nCPU per batch and per step (load average now {os.getloadavg()[0]:.1f}):\n")
        print("| format | px | batch, 1 thread (CPU ms) | step (CPU ms) | batch / step |")
        print("| --- | --- | --- | --- | --- |")
        for c in costs:
            step_cpu = c["alone"]["cpu_ms"]
            print(f"| {c['fmt']} | {c['size']} | {c['batch_cpu_ms']:.0f} | {step_cpu:.0f} | "
                  f"{100 * c['batch_cpu_ms'] / step_cpu:.0f}% |")


if __name__ == "__main__":
    main()
