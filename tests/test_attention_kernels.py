"""mmqa.models.attention: every function against the `eager` reference (values and gradients), the
masking rules (masked keys get no weight, fully masked rows give zeros), sliding-window banding,
linear attention's causality and chunking, tiled attention's gradcheck, and the Triton kernel under
the interpreter (in a subprocess, because TRITON_INTERPRET must be set before triton is imported)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mmqa.models.attention import (
    ATTENTION_FUNCTIONS,
    TokenLayout,
    eager,
    get_attention,
    linear,
    sdpa,
    sliding_window,
    sliding_window_mask,
    tiled,
    triton_tiled,
)
from mmqa.models.attention.linear import feature_map
from mmqa.models.attention.sliding_window import neighbourhood

ROOT = Path(__file__).resolve().parents[1]
# the package's `triton_tiled` attribute is the function, which shadows the submodule of that name
triton_module = importlib.import_module("mmqa.models.attention.triton_tiled")
CPU_FUNCTIONS = ["sdpa", "eager", "sliding_window", "linear", "tiled"]  # triton_tiled runs in a subprocess


def qkv(B=2, h=3, T=20, N=20, d=8, seed=0, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, h, T, d, generator=g, dtype=dtype)
    k, v = (torch.randn(B, h, N, d, generator=g, dtype=dtype) for _ in range(2))
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


def reference(q, k, v, visible):
    """softmax attention under an arbitrary (.., T, N) boolean mask, written out independently;
    every row must have a visible key."""
    weights = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).masked_fill(~visible, float("-inf")).softmax(-1)
    assert not weights.isnan().any()
    return weights @ v


def out_and_grads(fn, q, k, v):
    """Output and the gradients of q, k, v for a fixed random upstream gradient."""
    out = fn(q, k, v)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
    return (out, *torch.autograd.grad((out * upstream).sum(), (q, k, v)))


def assert_close_all(a, b, atol):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


# ---------------------------------------------------------------- dense: sdpa vs eager, masks


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T", [20, 13])  # T < N causal: bottom-right aligned
def test_sdpa_matches_eager(masked, causal, T):
    q, k, v = qkv(T=T, grad=True)
    key_mask = torch.rand(2, 20, generator=torch.Generator().manual_seed(1)) > 0.3 if masked else None
    assert_close_all(out_and_grads(lambda *a: sdpa(*a, key_mask, causal), q, k, v),
                     out_and_grads(lambda *a: eager(*a, key_mask, causal), q, k, v), atol=1e-5)


def test_eager_weights_follow_the_masks():
    q, k, v = qkv()
    key_mask = torch.ones(2, 20, dtype=torch.bool)
    key_mask[0, 5:9] = False
    key_mask[1] = False
    out, weights = eager(q, k, v, key_mask, causal=True, return_weights=True)  # (B, h, T, N)
    assert weights.shape == (2, 3, 20, 20)
    assert (weights[0, :, :, 5:9] == 0).all() and (weights[0].triu(1) == 0).all()
    torch.testing.assert_close(weights[0].sum(-1), torch.ones(3, 20))
    assert (weights[1] == 0).all() and (out[1] == 0).all()


@pytest.mark.parametrize("name", CPU_FUNCTIONS)
@pytest.mark.parametrize("causal", [False, True])
def test_fully_masked_rows_give_zeros_and_zero_grads(name, causal):
    q, k, v = qkv(grad=True)
    key_mask = torch.ones(2, 20, dtype=torch.bool)
    key_mask[1] = False  # batch 1: every key is padding
    key_mask[0, :3] = False  # batch 0, causal: the first three queries see nothing
    out, dq, dk, dv = out_and_grads(lambda *a: get_attention(name)(*a, key_mask, causal), q, k, v)
    assert (out[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    assert out.isfinite().all() and dq.isfinite().all() and dk.isfinite().all() and dv.isfinite().all()
    assert (out[0, :, :3] == 0).all() == causal  # without causal, those queries see the later keys


@pytest.mark.parametrize("name", CPU_FUNCTIONS)
def test_padding_is_never_attended(name):
    q, k, v = qkv()
    key_mask = torch.ones(2, 20, dtype=torch.bool)
    key_mask[0, 11:] = False
    key_mask[1, ::3] = False
    before = get_attention(name)(q, k, v, key_mask)
    k2, v2 = k.clone(), v.clone()
    k2[~key_mask[:, None, :].expand(-1, 3, -1)] = 1e3  # padding keys that would win every softmax
    v2[~key_mask[:, None, :].expand(-1, 3, -1)] = -1e3
    torch.testing.assert_close(get_attention(name)(q, k2, v2, key_mask), before, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- sliding window

GRID = TokenLayout((("global", 1), ("grid", 5), ("global", 3)))  # CLS, 5 x 5 patches, 3 question tokens


def sw_case(layout, window, causal, grad=True):
    N = len(layout)
    q, k, v = qkv(N=N, T=N, grad=grad, seed=window)
    key_mask = torch.ones(2, N, dtype=torch.bool)
    first = 0 if layout.segments[0][0] == "global" else 1  # a causal row 0 must keep its one key
    key_mask[0, [first, 3, 4, 10]] = False  # batch 0: the CLS (global) token and some local keys
    key_mask[1, [N - 1, N - 5]] = False  # batch 1: a suffix global token (grid) / late keys (seq)
    return q, k, v, key_mask


@pytest.mark.parametrize(
    "layout,window,causal",
    [(GRID, 1, False), (GRID, 2, False), (TokenLayout.seq(17), 2, False), (TokenLayout.seq(17), 3, True),
     (TokenLayout((("global", 2), ("grid", 3), ("seq", 6))), 1, False)],
)
def test_sliding_window_matches_eager_with_its_dense_mask(layout, window, causal):
    q, k, v, key_mask = sw_case(layout, window, causal)
    visible = sliding_window_mask(layout, window, causal) & key_mask[:, None, None, :]  # (B, 1, N, N)
    assert not visible.all()  # the band really restricts attention
    assert_close_all(out_and_grads(lambda *a: sliding_window(*a, key_mask, causal, layout, window), q, k, v),
                     out_and_grads(lambda *a: reference(*a, visible), q, k, v), atol=1e-5)


def test_sliding_window_mask_by_hand():
    mask = sliding_window_mask(TokenLayout.grid(3, prefix=1, suffix=1), window=1)  # 1 + 9 + 1 tokens
    assert mask[0].all() and mask[:, 0].all() and mask[10].all() and mask[:, 10].all()  # global rows, columns
    patches = mask[1:10, 1:10]
    assert patches[4].sum() == 9 and patches[0].sum() == 4 and patches[1].sum() == 6  # centre, corner, edge
    assert patches[0].tolist() == [True, True, False, True, True, False, False, False, False]
    band = sliding_window_mask(TokenLayout.seq(6), window=1, causal=True)
    assert band.long().tolist()[3] == [0, 0, 1, 1, 0, 0]


@pytest.mark.parametrize("layout,window", [(GRID, 4), (GRID, 9), (TokenLayout.seq(25), 24), (TokenLayout.seq(25), 99)])
def test_radius_beyond_the_segment_is_full_attention(layout, window):
    q, k, v, key_mask = sw_case(layout, window, False, grad=False)
    torch.testing.assert_close(sliding_window(q, k, v, key_mask, layout=layout, window=window),
                               eager(q, k, v, key_mask), atol=1e-5, rtol=0)


def test_neighbourhood_is_banded():
    # (2r+1)^2 keys a patch, 2r+1 (causal r+1) a token, however long the segment: work per query does not grow with N
    for g in (5, 16, 64):
        for r in (1, 2):
            hood = neighbourhood("grid", g, r, False)
            assert len(hood.offsets) == (2 * r + 1) ** 2 and hood.pad == (r, r, r, r)
    assert len(neighbourhood("seq", 300, 3, False).offsets) == 7
    causal = neighbourhood("seq", 300, 3, True)
    assert causal.offsets == ((0, 0), (0, 1), (0, 2), (0, 3)) and causal.pad == (3, 0, 0, 0)  # keys i-3 .. i
    assert len(neighbourhood("grid", 3, 9, False).offsets) == 25  # clamped to the grid: r = 2


def test_sliding_window_rejects_bad_shapes():
    q, k, v = qkv(T=20, N=20)
    with pytest.raises(ValueError, match=r"19.*20"):
        sliding_window(q, k, v, layout=TokenLayout.seq(19))
    with pytest.raises(ValueError, match=r"self-attention only \(T == N\)"):
        sliding_window(q[:, :, :5], k, v)
    with pytest.raises(ValueError, match="'seq' segments only"):
        sliding_window(q, k, v, causal=True, layout=TokenLayout((("global", 4), ("grid", 4))))


# ---------------------------------------------------------------- linear


def linear_explicit(q, k, v, key_mask, causal, eps=1e-6):
    """phi(Q) phi(K)^T with masks, normalised by its row sums: the O(N^2) form of linear attention."""
    A = feature_map(q) @ feature_map(k).transpose(-2, -1) * key_mask[:, None, None, :]  # (B, h, T, N)
    if causal:
        A = A.tril()
    return (A @ v) / (A.sum(-1, keepdim=True) + eps)


@pytest.mark.parametrize("causal,chunk_size", [(False, 64), (True, 5), (True, 7), (True, 64)])
def test_linear_matches_its_explicit_formula(causal, chunk_size):
    q, k, v = qkv(dtype=torch.float64)  # N = 20: chunk 5 divides it, 7 and 64 do not
    key_mask = torch.rand(2, 20, generator=torch.Generator().manual_seed(2)) > 0.3
    torch.testing.assert_close(linear(q, k, v, key_mask, causal, chunk_size=chunk_size),
                               linear_explicit(q, k, v, key_mask, causal), atol=1e-10, rtol=1e-10)


def test_linear_causal_never_looks_ahead():
    q, k, v = qkv()
    before = linear(q, k, v, causal=True, chunk_size=6)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 9:] = torch.randn(2, 3, 11, 8)  # 9 is inside the second chunk: checks the in-chunk mask too
    v2[:, :, 9:] = 100.0
    after = linear(q, k2, v2, causal=True, chunk_size=6)
    assert torch.equal(after[:, :, :9], before[:, :, :9]) and not torch.equal(after[:, :, 9:], before[:, :, 9:])
    with pytest.raises(ValueError, match="T == N"):
        linear(q[:, :, :4], k, v, causal=True)


# ---------------------------------------------------------------- tiled


@pytest.mark.parametrize("T,N", [(37, 45), (45, 37), (40, 40)])
@pytest.mark.parametrize("causal", [False, True])
def test_tiled_matches_eager_with_gradients(T, N, causal):
    q, k, v = qkv(T=T, N=N, d=16, grad=True)
    key_mask = torch.rand(2, N, generator=torch.Generator().manual_seed(3)) > 0.25
    key_mask[1, :10] = False
    assert_close_all(out_and_grads(lambda *a: tiled(*a, key_mask, causal, block_q=16, block_k=8), q, k, v),
                     out_and_grads(lambda *a: eager(*a, key_mask, causal), q, k, v), atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_tiled_gradcheck(masked, causal):
    q, k, v = qkv(B=1, h=2, T=5, N=7, d=4, dtype=torch.float64, grad=True)
    key_mask = torch.tensor([[True, False, True, True, False, True, False]]) if masked else None
    assert torch.autograd.gradcheck(lambda *a: tiled(*a, key_mask, causal, block_q=2, block_k=3), (q, k, v))


# ---------------------------------------------------------------- triton (interpreter, subprocess)

TRITON_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from mmqa.models.attention import eager, triton_tiled
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 21, 12, generator=g)
    k, v = torch.randn(2, 2, 2, 37, 12, generator=g)
    key_mask = torch.rand(2, 37, generator=g) > 0.3
    key_mask[1] = False
    report = {"errors": [], "zero_row": None, "float64": None}
    for q_ in (q, q[:, :, :16], torch.cat([q, q], 2)):  # T < N, T < N, T > N (bottom-right causal)
        for mask in (None, key_mask):
            for causal in (False, True):
                out = triton_tiled(q_, k, v, mask, causal, block_q=16, block_k=16)
                report["errors"].append((out - eager(q_, k, v, mask, causal)).abs().max().item())
    report["zero_row"] = triton_tiled(q, k, v, key_mask, block_q=16, block_k=16)[1].abs().max().item()
    try:
        triton_tiled(q.double(), k.double(), v.double())
    except TypeError as e:
        report["float64"] = str(e)
    print(json.dumps(report))
""")


def run_python(script: str, interpret: bool) -> str:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@needs_triton
def test_triton_tiled_matches_eager_under_the_interpreter():
    report = json.loads(run_python(TRITON_SCRIPT, interpret=True))
    assert len(report["errors"]) == 12 and max(report["errors"]) < 1e-4, report["errors"]
    assert report["zero_row"] == 0.0
    assert "torch.float64" in report["float64"] and "float32 is required" in report["float64"]


@needs_triton
def test_triton_tiled_without_interpreter_on_cpu_says_what_to_do():
    script = textwrap.dedent("""
        import sys, torch
        import mmqa.models.attention as attention
        assert "triton" not in sys.modules  # the package never imports triton by itself
        try:
            attention.triton_tiled(*torch.randn(3, 1, 1, 16, 16))
        except RuntimeError as e:
            print(e)
    """)
    assert "TRITON_INTERPRET=1" in run_python(script, interpret=False)


def test_triton_tiled_refuses_autograd_and_reports_a_missing_triton(monkeypatch):
    q, k, v = qkv(grad=True)
    with pytest.raises(NotImplementedError, match="use tiled for training"):
        triton_tiled(q, k, v)
    monkeypatch.setattr(triton_module, "triton", None)
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    with torch.no_grad(), pytest.raises(ImportError, match="not installed"):
        triton_tiled(q, k, v)


# ---------------------------------------------------------------- registry


def test_get_attention():
    assert list(ATTENTION_FUNCTIONS) == ["sdpa", "eager", "sliding_window", "linear", "tiled", "triton_tiled"]
    assert get_attention("tiled") is tiled and get_attention("linear") is linear
    with pytest.raises(ValueError, match="'nope'; valid: sdpa, eager, sliding_window, linear, tiled, triton_tiled"):
        get_attention("nope")
