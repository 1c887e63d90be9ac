"""What a model costs to train, written into every run's metrics.json next to its quality:

- `model/gflops_per_image`: forward FLOPs of every task's loss on one training batch, per image,
  counted by `torch.utils.flop_counter` (matmul-like ops, where a transformer's work is). The counter
  has no formula for PyTorch's CPU SDPA kernel, nor for the in-place `baddbmm_` / `addmm_` (the tiled
  kernel's accumulations); this module registers the counter's own formulas for them, so every
  attention variant is counted, not some as zero;
- `train/step_seconds`: the median wall time of a training step (forward, backward, optimiser),
  measured by the `StepTimer` callback;
- `train/peak_rss_mb`: the training process's peak resident memory during the run (`PeakMemory`;
  data-loader workers, separate processes, are not counted).
"""

from __future__ import annotations

import math
import resource
import statistics
import time

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.utils import flop_counter

aten = torch.ops.aten


@flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


@flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _sdpa_cpu_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


@flop_counter.register_flop_formula([aten.baddbmm_, aten.addmm_])
def _inplace_matmul_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(a_shape) * b_shape[-1]  # (B, n, k) @ (B, k, m), or (n, k) @ (k, m)


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs of `fn(*args, **kwargs)` (its backward too, if it runs one)."""
    with flop_counter.FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def gflops_per_image(lit: L.LightningModule, batch) -> float:
    """Forward GFLOPs of `lit.compute_losses(batch)` per image. Runs in eval mode without gradients,
    so nothing the run trained or measured changes (no BatchNorm statistics, no random draws)."""
    was_training = lit.training
    lit.eval()
    try:
        with torch.no_grad():
            flops = count_flops(lit.compute_losses, move_data_to_device(batch, lit.device))
    finally:
        lit.train(was_training)
    return flops / len(batch.images) / 1e9


class StepTimer(L.Callback):
    """Median seconds of a training step, leaving out the first `warmup` steps (first calls are slow)
    unless the run had no more than those."""

    def __init__(self, warmup: int = 5):
        self.warmup = warmup
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._start)

    def median(self) -> float:
        timed = self.seconds[self.warmup:] or self.seconds
        return statistics.median(timed) if timed else float("nan")


class PeakMemory:
    """The process's peak resident memory from `start()` on. Linux keeps one peak per process, which
    `/proc/self/clear_refs` resets, so that a run started in a process that ran others (a Hydra
    multirun, tests) reports its own; elsewhere the peak is the process's since it began."""

    STATUS, CLEAR = "/proc/self/status", "/proc/self/clear_refs"

    def start(self) -> None:
        try:
            with open(self.CLEAR, "w") as f:
                f.write("5")  # reset VmHWM to the current resident size
        except OSError:
            pass

    def peak_mb(self) -> float:
        try:
            with open(self.STATUS) as f:
                kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux and BSD: KiB
        return kib / 1024
