"""Training checkpoints that lose nothing and run nothing: how mmqa writes, reads and resumes
Lightning checkpoints.

- `AtomicCheckpointIO` writes each checkpoint into a temporary file beside its target, fsyncs it and
  renames it into place, so a kill during a save leaves the previous file whole. (Lightning's own
  writer stages the file in the system temporary folder and moves it; across file systems that move
  is a copy, which a kill can cut short.) It reads every checkpoint with `weights_only=True`:
  tensors and plain data only, so a planted pickle can never run code; such a file is refused with
  `UnsafeCheckpointError`.
- `RNGState` puts Python's, NumPy's and torch's random states into every checkpoint and restores
  them on resume, so a resumed run draws what the uninterrupted run would have drawn (caption picks,
  dropout). With the data module's resumable training order, a resumed run ends where the
  uninterrupted one does.
- `SaveOnSigterm`: a cluster pre-empting a job sends SIGTERM; Lightning then stops after the current
  training batch, and this callback saves `last.ckpt` there before the process exits.
- `RunCheckpoint`: Lightning's `ModelCheckpoint`, fit for `ckpt_path=last` into a new run folder and
  for mid-epoch saves (see the class).
"""

from __future__ import annotations

import logging
import pickle
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mmqa.atomic import atomic_file
from mmqa.errors import MMQAError

log = logging.getLogger(__name__)

LAST = "last.ckpt"


class UnsafeCheckpointError(MMQAError):
    """A checkpoint holds pickled objects other than tensors and plain data, and was not loaded."""


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_file(path) as tmp, open(tmp, "wb") as f:  # the old file or the new one, never half
            torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Always `weights_only=True`, whatever the caller asks."""
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's message names the offending global, e.g. "Unsupported global: GLOBAL posix.system"
            detail = next((line.strip() for line in str(e).splitlines() if "global" in line.lower()), str(e))
            raise UnsafeCheckpointError(
                f"{path}: refused: the checkpoint holds pickled objects other than tensors and plain data "
                f"({detail}). mmqa loads checkpoints with weights_only=True so that no file can run code; "
                f"resume only from checkpoints written by mmqa"
            ) from None


class RNGState(L.Callback):
    """Python's, NumPy's and torch's random states, saved in each checkpoint and restored on resume."""

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        return {
            "python": random.getstate(),  # (version, tuple of ints, None): plain data, loads weights-only
            "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(trainer: L.Trainer) -> Path:
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        return Path(callback.dirpath)
    return Path(trainer.default_root_dir) / "checkpoints"


class SaveOnSigterm(L.Callback):
    """On SIGTERM during training, save `last.ckpt` at the batch Lightning stopped after.

    Lightning's SIGTERM handler only sets a flag; its loops raise `SIGTERMException` at the next safe
    point. A stop inside validation saves nothing: resuming there would score the epoch on part of
    the validation set, so the newest checkpoint (the previous step or epoch) stays the one to resume."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        if trainer.validating or trainer.sanity_checking:
            log.warning("SIGTERM during validation: no new checkpoint; resume from the newest one with ckpt_path=last")
            return
        path = checkpoint_dir(trainer) / LAST
        trainer.save_checkpoint(path)
        log.warning(f"SIGTERM: saved {path} at step {trainer.global_step}; resume with ckpt_path=last")


class RunCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint`, with two changes for resuming:

    - `ckpt_path=last` resumes into a new run folder. Lightning then forgets the best score so far
      (its state is tied to the folder), and the first epoch after the resume would count as best
      whatever its score; here the score is kept, so the best checkpoint, and the final metrics
      computed from it, are those of the uninterrupted run. (Lightning never deletes a file outside
      this run's folder, so the earlier run's checkpoints stay.)
    - With `every_n_train_steps`, no mid-epoch save on an epoch's last batch: resumed from there,
      Lightning would go on to the next epoch without validating this one.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dirpath") != self.dirpath:  # resumed into a new run folder: last.ckpt is this run's own
            state_dict = {**state_dict, "dirpath": self.dirpath, "last_model_path": ""}
        super().load_state_dict(state_dict)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            super().on_train_batch_end(trainer, *args, **kwargs)
