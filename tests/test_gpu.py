"""`trainer=gpu` (bf16 mixed precision) on a real CUDA device; skipped where there is none."""

from __future__ import annotations

import pytest
import torch

from mmqa.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (trainer=gpu)")


def test_tiny_bf16_run_on_gpu(tiny_cfg):
    metrics = train(tiny_cfg("trainer=gpu"))
    assert 0.0 <= metrics["test/vqa_acc"] <= 1.0
    assert metrics["train/epochs"] == 1
