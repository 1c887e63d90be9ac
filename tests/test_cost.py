"""mmqa/cost.py: FLOPs that count every attention variant (SDPA's CPU kernel and the tiled kernel's
in-place matmuls included), a FLOP count that leaves the model as it was, and the step timer."""

from __future__ import annotations

import functools

import pytest
import torch

from mmqa.cost import PeakMemory, StepTimer, count_flops, gflops_per_image
from mmqa.models.attention import eager, sdpa, tiled


@pytest.mark.parametrize("fn", [eager, sdpa, functools.partial(tiled, block_q=8, block_k=8)], ids=["eager", "sdpa", "tiled"])
def test_exact_attention_counts_4_n2_d_per_head_forward(fn):
    B, h, N, d = 2, 3, 32, 16
    q, k, v = torch.randn(3, B, h, N, d).unbind(0)
    with torch.no_grad():
        assert count_flops(fn, q, k, v) == 4 * B * h * N * N * d  # QK^T and PV, 2 FLOPs a multiply-add


def test_sdpa_backward_is_counted():
    q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(3))
    forward = count_flops(lambda: sdpa(q, k, v))
    both = count_flops(lambda: sdpa(q, k, v).sum().backward())
    assert both > 2 * forward  # the backward recomputes the scores and takes four more products


def test_flops_per_image_leave_the_model_as_it_was(tiny_parts):
    _, _, model, lit, batch = tiny_parts()
    lit.train()
    before = {k: v.clone() for k, v in lit.state_dict().items()}  # BatchNorm running stats included
    rng = torch.get_rng_state()
    g = gflops_per_image(lit, batch)
    assert g > 0 and lit.training
    assert all(torch.equal(before[k], v) for k, v in lit.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert gflops_per_image(lit, batch) == g


def test_step_timer_leaves_out_warmup_unless_that_is_all_there_is():
    timer = StepTimer(warmup=2)
    assert timer.median() != timer.median()  # NaN before any step
    timer.seconds = [9.0, 9.0, 1.0, 2.0, 3.0]
    assert timer.median() == 2.0
    timer.seconds = [9.0, 5.0]
    assert timer.median() == 7.0


def test_peak_memory_counts_from_its_start_not_from_the_process_start():
    memory = PeakMemory()
    big = torch.ones(64 * 2**20)  # 256 MiB, written so that it is resident
    held = memory.peak_mb()
    del big
    memory.start()
    base = memory.peak_mb()
    assert base < held - 200  # the earlier peak is forgotten
    again = torch.ones(32 * 2**20)  # 128 MiB
    assert memory.peak_mb() > base + 120
    del again
