"""A callback the DDP test adds from the command line: each rank writes which training images it saw
and its own (not yet reduced) validation VQA sums, so the test can check the data split and the
reduction."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class SeenProbe(Callback):
    def __init__(self, out: str):
        self.out = Path(out)
        self.ids: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids += batch.image_ids.tolist()

    def on_validation_epoch_end(self, trainer, pl_module):
        # callbacks run before the LightningModule's hook, which computes and resets the metric
        metric = pl_module.val_vqa
        record = dict(ids=self.ids, sum=float(metric.total_sum), count=int(metric.total_count))
        (self.out / f"probe_rank{trainer.global_rank}.json").write_text(json.dumps(record))
