"""Crash and resume: a training process killed with SIGKILL mid-epoch, or stopped by SIGTERM, resumes
with `ckpt_path=last` and ends with the metrics of the uninterrupted run; checkpoints are written
atomically, so a kill during a save leaves the previous file whole.

The WordPiece tokenizer a fresh run fits is not deterministic (the `tokenizers` trainer orders
subwords of equal count arbitrarily), so two fresh runs of one seed differ in their token ids. Every
run here therefore continues from one shared first epoch and reuses its tokenizer and answers (a run
given `ckpt_path` reads them from the bundle folder of the run it resumes); from there, training is
deterministic and the comparison is to 1e-6 (in practice the numbers are identical)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT, TINY, compose_cfg

from mmqa.checkpointing import AtomicCheckpointIO
from mmqa.train import find_last_checkpoint, train

# deterministic kernels, a checkpoint after every step (never on an epoch's last one); no caption
# generation and no test split, which cost time and add nothing to the comparison (val/ metrics)
RESUMABLE = ["trainer.deterministic=true", "callbacks.step_checkpoint.every_n_train_steps=1",
             "eval.max_caption_eval_images=0", "data.reader.n_test=0", "trainer.max_epochs=2"]
TIMINGS = {"train/fit_seconds", "train/images_per_second", "train/step_seconds", "train/peak_rss_mb"}  # measurements: the only metrics allowed to differ
STEPS_PER_EPOCH = 3  # 24 tiny training images, batches of 8


class StopAt(L.Callback):
    """After batch `batch` of epoch `epoch`: send this process `signal` (if given); write `marker` (if
    given) and wait there until the process is signalled, so that a test can kill it mid-epoch."""

    def __init__(self, epoch: int, batch: int, signal: int | None = None, marker: str | None = None):
        self.at, self.signal, self.marker = (epoch, batch), signal, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) != self.at:
            return
        if self.signal is not None:
            os.kill(os.getpid(), self.signal)
        if self.marker is not None:
            Path(self.marker).write_text(str(trainer.global_step))
            deadline = time.monotonic() + 240
            while not trainer.received_sigterm and time.monotonic() < deadline:
                time.sleep(0.05)


def stop_at(epoch: int, batch: int, **kw) -> list[str]:
    return [f"+callbacks.stop._target_={__name__}.StopAt", f"+callbacks.stop.epoch={epoch}",
            f"+callbacks.stop.batch={batch}", *(f"+callbacks.stop.{k}={v}" for k, v in kw.items())]


@pytest.fixture(scope="module")
def first_epoch(tmp_path_factory, data_dir) -> tuple[Path, Path]:
    """(runs folder, last.ckpt of a one-epoch run that every other run continues)."""
    runs = tmp_path_factory.mktemp("resume")
    train(compose_cfg(data_dir, runs / "first", [*RESUMABLE, "trainer.max_epochs=1"]))
    return runs, runs / "first" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def uninterrupted(first_epoch, data_dir) -> dict[str, float]:
    runs, base = first_epoch
    return train(compose_cfg(data_dir, runs / "uninterrupted", [*RESUMABLE, f"ckpt_path={base}"]))


def global_step(ckpt: Path) -> int:
    return torch.load(ckpt, weights_only=True)["global_step"]


def resume_and_compare(runs: Path, name: str, interrupted: Path, uninterrupted: dict, data_dir) -> None:
    cfg = compose_cfg(data_dir, runs / name, [*RESUMABLE, "ckpt_path=last"])
    assert find_last_checkpoint(cfg, runs / name) == interrupted / "checkpoints" / "last.ckpt"
    resumed = train(cfg)
    assert set(resumed) == set(uninterrupted)
    for key in sorted(set(uninterrupted) - TIMINGS):
        assert resumed[key] == pytest.approx(uninterrupted[key], abs=1e-6), key


def test_sigkill_mid_epoch_then_resume_ends_like_the_uninterrupted_run(first_epoch, uninterrupted, data_dir):
    runs, base = first_epoch
    killed, marker = runs / "killed", runs / "killed.marker"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "tests")}
    args = [*TINY, *RESUMABLE, f"ckpt_path={base}", *stop_at(1, 1, marker=marker),
            f"paths.data_dir={data_dir}", f"hydra.run.dir={killed}"]
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "train.py never reached epoch 1, batch 1"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)  # mid-epoch 1, after its second step
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert marker.read_text() == str(STEPS_PER_EPOCH + 2)
    # the newest checkpoint is the step checkpoint before the one the kill interrupted
    assert global_step(killed / "checkpoints" / "last.ckpt") == STEPS_PER_EPOCH + 1
    resume_and_compare(runs, "after_kill", killed, uninterrupted, data_dir)


def test_sigterm_saves_last_ckpt_at_that_step_and_resumes(first_epoch, uninterrupted, data_dir):
    runs, base = first_epoch
    stopped = runs / "sigterm"
    # no step checkpoints: the last.ckpt of this run can only come from the SIGTERM handling
    cfg = compose_cfg(data_dir, stopped, [*RESUMABLE, f"ckpt_path={base}", "callbacks.step_checkpoint=null",
                                          *stop_at(1, 0, signal=int(signal.SIGTERM))])
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        train(cfg)
    assert stop.value.code == 128 + signal.SIGTERM
    assert global_step(stopped / "checkpoints" / "last.ckpt") == STEPS_PER_EPOCH + 1
    assert signal.getsignal(signal.SIGTERM) == handler  # Lightning gave the handler back
    resume_and_compare(runs, "after_sigterm", stopped, uninterrupted, data_dir)


def test_a_failed_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(1000), "step": 1}, path)

    def killed_halfway(obj, f):  # write part of the new file, then die
        f.write(b"PK\x03\x04" + b"\0" * 5000)
        raise KeyboardInterrupt

    monkeypatch.setattr("mmqa.checkpointing.torch.save", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"w": torch.zeros(1000), "step": 2}, path)
    old = io.load_checkpoint(path)
    assert old["step"] == 1 and torch.equal(old["w"], torch.ones(1000))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left behind
    monkeypatch.undo()
    io.save_checkpoint({"w": torch.zeros(1000), "step": 2}, path)
    assert io.load_checkpoint(path)["step"] == 2
