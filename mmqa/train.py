"""Training orchestration: `train(cfg) -> metrics`. Checks the composed config, builds data, tokenizers
and model from it, fits with Lightning, tests the best checkpoint, and writes `metrics.json` and the
inference bundle into the run folder. `train.py` at the top level is the Hydra entry point around it."""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import time
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from mmqa.atomic import write_json
from mmqa.build import build_experiment, test_split
from mmqa.bundle import Bundle, read_assets, write_assets
from mmqa.checkpointing import AtomicCheckpointIO, RNGState, SaveOnSigterm
from mmqa.config_check import check_config
from mmqa.cost import PeakMemory, StepTimer, gflops_per_image
from mmqa.data.datamodule import MMQADataModule
from mmqa.errors import ConfigError

log = logging.getLogger(__name__)

RUN_KEY = "run_key.txt"
SKIPPED = "skipped.jsonl"  # with data.on_bad_sample=skip: one line per dropped sample


# Keys that may change between an interrupted run and its resumption (more epochs, another device,
# other loggers) without making it a different experiment.
NOT_IN_RUN_KEY = ("ckpt_path", "paths", "trainer", "logger", "callbacks", "compile")


def run_key(cfg: DictConfig) -> str:
    """Identity of a run's experiment: data, model, losses, optimiser, seed — not `NOT_IN_RUN_KEY`."""
    c = OmegaConf.to_container(cfg, resolve=False)
    for k in NOT_IN_RUN_KEY:
        c.pop(k, None)
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:16]


def find_last_checkpoint(cfg: DictConfig, output_dir: Path) -> Path:
    """`ckpt_path=last`: the newest `checkpoints/last.ckpt` among earlier runs of this same config."""
    key = run_key(cfg)
    runs_root = output_dir.parent
    found = [
        d / "checkpoints" / "last.ckpt"
        for d in runs_root.glob("*")
        if d != output_dir and (d / RUN_KEY).is_file() and (d / RUN_KEY).read_text().strip() == key
        and (d / "checkpoints" / "last.ckpt").is_file()
    ]
    if not found:
        raise ConfigError(
            f"ckpt_path=last: no earlier run of this config with checkpoints/last.ckpt under {runs_root}; "
            f"start a new run without ckpt_path, or pass ckpt_path=/path/to/file.ckpt"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def _resolve_ckpt(cfg: DictConfig, output_dir: Path) -> Path | None:
    if cfg.ckpt_path is None:
        return None
    if cfg.ckpt_path == "last":
        return find_last_checkpoint(cfg, output_dir)
    path = Path(cfg.ckpt_path).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt_path: no checkpoint file at {path}")
    return path


def report_skipped(dm: MMQADataModule, out: Path) -> None:
    """With data.on_bad_sample=skip: say how many samples were dropped and why, and list them in the run folder."""
    skip_log = dm.skip_log
    if skip_log.mode != "skip":
        return
    skip_log.write(out / SKIPPED)
    if skip_log.skipped:
        log.warning(f"data.on_bad_sample=skip: {skip_log.summary()}; each is listed in {out / SKIPPED}")


def fill_text_cache(model, dm: MMQADataModule, rows_per_pass: int, captions: bool = True) -> None:
    """Encode every distinct question and caption that fitting reads (train and val) through the frozen
    text encoder before the first step, in long batches of like lengths (`text_cache_fill`).
    `captions=False`: the questions only (a distillation teacher reads no caption through it)."""
    start, n = time.perf_counter(), 0
    for split in ("train", "val"):
        for ids, mask in dm.distinct_texts(split)[: None if captions else 1]:  # an empty split gives no rows
            n += model.text_cache.fill(model.text_encoder, ids, mask, rows_per_pass)
    log.info(f"text cache: {n} distinct texts encoded in {time.perf_counter() - start:.0f} s")


def train(cfg: DictConfig) -> dict[str, float]:
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resume = _resolve_ckpt(cfg, out)

    if rank_zero_only.rank > 0:
        # DDP starts the other ranks once rank 0 reaches `fit`, after it wrote the run's assets:
        # every rank must share its vocabulary, so they read it rather than build their own
        assets = read_assets(out / "bundle")[1:]
    elif resume is not None:  # a resumed run reuses the tokenizers and answers of the interrupted one
        assets = read_assets(resume.parent.parent / "bundle")[1:]
    else:
        assets = None
    dm, lit = build_experiment(cfg, assets)
    if cfg.compile:
        lit.model.compile_towers()
    teacher = lit.distiller.teacher if lit.distiller is not None else None
    for model in (lit.model, teacher):
        if model is not None and model.text_cache is not None and cfg.text_cache_fill > 0:
            fill_text_cache(model, dm, cfg.text_cache_fill, captions=model is lit.model)
    if rank_zero_only.rank == 0:
        (out / RUN_KEY).write_text(run_key(cfg))
        write_assets(out / "bundle", cfg, *dm.tokenizers, dm.answers, dm.ingredients)
        report_skipped(dm, out)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    # not config: a resumed run must draw what the uninterrupted one drew, and a pre-empted one must save
    timer = StepTimer()
    callbacks += [RNGState(), SaveOnSigterm(), timer]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()])

    memory = PeakMemory()
    memory.start()
    start = time.perf_counter()
    try:
        trainer.fit(lit, datamodule=dm, ckpt_path=resume, weights_only=True)
    except SIGTERMException:
        raise SystemExit(128 + signal.SIGTERM) from None  # the shell's code for "ended by SIGTERM"
    fit_s = time.perf_counter() - start

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    ckpt = best or None
    metrics = {}
    for result in trainer.validate(lit, datamodule=dm, ckpt_path=ckpt, weights_only=True) + (
        trainer.test(lit, datamodule=dm, ckpt_path=ckpt, weights_only=True) if dm.records["test"] else []
    ):
        metrics.update(result)
    if dm.records["test_paraphrase"]:  # the same test questions in wordings training never saw
        metrics.update(test_split(trainer, lit, dm, "test_paraphrase", ckpt_path=ckpt, weights_only=True))
    n_train = len(dm.records["train"])
    metrics.update(
        {
            "train/fit_seconds": fit_s,
            "train/images_per_second": n_train * max(trainer.current_epoch, 1) / fit_s,
            "train/epochs": trainer.current_epoch,
            "train/step_seconds": timer.median(),
            "train/peak_rss_mb": memory.peak_mb(),
            "model/parameters": sum(p.numel() for p in lit.model.parameters()),
            "model/trainable_parameters": sum(p.numel() for p in lit.model.parameters() if p.requires_grad),
            "model/gflops_per_image": gflops_per_image(lit, next(iter(dm.loader("train", train=False)))),
        }
    )
    for callback in callbacks:  # e.g. the diagnostics callback's alarm counts
        metrics.update(callback.run_metrics() if hasattr(callback, "run_metrics") else {})
    metrics = {k: float(v) for k, v in metrics.items()}
    if trainer.is_global_zero:
        Bundle(cfg, lit.model, *dm.tokenizers, dm.answers, dm.ingredients).save(out / "bundle")
        write_json(out / "metrics.json", metrics)
    return metrics
