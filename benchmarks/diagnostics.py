"""What the diagnostics callback costs: the default run's training loop with the callback off and on.

    python benchmarks/diagnostics.py [--steps 150] [--repeats 2] [--every 50] [override ...]

Builds the default config (any Hydra override may follow) and times Lightning's `fit` for `--steps`
optimiser steps (no validation, a CSV logger in a temporary folder, as a run has), alternating off /
on `--repeats` times so that both arms see the same machine load; prints seconds per step (median over
repeats) and the overhead of the callback at `every_n_steps=--every`.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.loggers import CSVLogger

import mmqa.config_check  # noqa: F401 - registers the config schema conf/train.yaml names
from mmqa.build import build_experiment
from mmqa.callbacks.diagnostics import Diagnostics

ROOT = Path(__file__).resolve().parents[1]


def fit_seconds(overrides: list[str], steps: int, every: int | None) -> float:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.root_dir={ROOT}", f"paths.data_dir={ROOT}/data",
                                          "paths.output_dir=/tmp/mmqa-bench"])
    L.seed_everything(0)
    dm, lit = build_experiment(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        callbacks = [Diagnostics(every_n_steps=every, dirpath=None)] if every else []
        trainer = L.Trainer(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, logger=CSVLogger(tmp),
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=callbacks, accelerator="auto", devices=1)
        start = time.perf_counter()
        trainer.fit(lit, datamodule=dm)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.WARNING)
    times: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(args.repeats):
        for arm, every in (("off", None), ("on", args.every)):
            times[arm].append(fit_seconds(args.overrides, args.steps, every) / args.steps)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    print(f"{args.steps} steps, {torch.get_num_threads()} threads, median of {args.repeats}; overrides: {args.overrides}")
    print("| callback | s / step | runs (s / step) |\n| --- | --- | --- |")
    print(f"| off | {off:.4f} | {', '.join(f'{t:.4f}' for t in times['off'])} |")
    print(f"| on, every_n_steps={args.every} | {on:.4f} | {', '.join(f'{t:.4f}' for t in times['on'])} |")
    print(f"overhead: {100 * (on / off - 1):+.1f}%")


if __name__ == "__main__":
    main()
