"""The forward of `tiled` (FlashAttention-2, online softmax) as one Triton kernel; no backward.

One program handles one block of queries of one (batch, head): it loads the query tile once, walks the
key tiles with a running max, running sum and rescaled accumulator kept in registers, and writes the
output tile. Nothing of size (T, N) is ever stored. For training use `tiled` (it has the backward).

Where it runs:
- CUDA tensors: compiled as a normal kernel. float32 dots use input_precision="ieee" so that results
  match `eager` to float32 rounding (TF32 tensor cores would be faster but differ by ~1e-3);
  float16 / bfloat16 use the tensor cores, accumulating in float32.
- CPU tensors: only under the Triton interpreter (TRITON_INTERPRET=1), which runs the kernel in NumPy,
  and only in float32 (other dtypes raise TypeError).

Triton is imported on first call, never at import time, so the package imports without it. The
interpreter must be chosen before triton is first imported in the process: triton.language wraps its
own library functions (tl.zeros, tl.max, ...) for the interpreter or for the compiler at import time,
whatever TRITON_INTERPRET says later. Set the variable in the environment of the process (tests run
the kernel in a subprocess for this reason); a process whose setting changed after the import gets a
RuntimeError instead of a confusing failure inside the kernel.

Masking follows the package: `key_mask` (B, N) True = attend; rows with no visible key -> zeros;
causal is bottom-right aligned (query i sees keys j <= i + N - T).
"""

from __future__ import annotations

import functools

import torch

from mmqa.models.attention.dense import check_inputs

# set by _load_triton(). The kernel reads `tl` as a module global (the interpreter looks for it there), and
# its annotations stay strings (from __future__ import annotations), so defining it needs no triton.
triton = None
tl = None


def _load_triton() -> None:
    global triton, tl
    if triton is None:
        try:
            import triton as triton_module
            import triton.language as tl_module
        except ImportError as e:
            raise ImportError("triton_tiled needs triton, which is not installed; use `tiled` instead") from e
        triton, tl = triton_module, tl_module


def _attention_fwd_kernel(
    Q, K, V, Mask, Out,  # Q/Out (B*h, T, D), K/V (B*h, N, D) contiguous; Mask (B, N) int8
    T, N, H, offset, scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_q = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64: B*h*T*D can pass 2^31
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D  # head dims padded up to a power of two are loaded as 0
    q = tl.load(Q + bh * T * D + offs_q[:, None] * D + offs_d[None, :], mask=(offs_q[:, None] < T) & d_ok, other=0.0)

    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)  # running max
    l_i = tl.zeros([BLOCK_Q], tl.float32)  # running sum of exp(s - m)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)  # running sum of exp(s - m) v
    hi = N
    if CAUSAL:  # key tiles past the last query's reach are skipped
        hi = tl.minimum(N, (pid_q + 1) * BLOCK_Q + offset)
    for start in range(0, hi, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        kv_ok = (offs_k[:, None] < N) & d_ok
        k = tl.load(K + bh * N * D + offs_k[:, None] * D + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V + bh * N * D + offs_k[:, None] * D + offs_d[None, :], mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BLOCK_Q, BLOCK_K)

        visible = (offs_k < N)[None, :]
        if HAS_MASK:
            keep = tl.load(Mask + (bh // H) * N + offs_k, mask=offs_k < N, other=0)
            visible = visible & (keep != 0)[None, :]
        if CAUSAL:
            visible = visible & (offs_k[None, :] <= offs_q[:, None] + offset)
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with nothing visible so far keeps max -inf; exp(-inf - 0) = 0 instead of NaN
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_ref[:, None])
        rescale = tl.exp(m_i - m_ref)
        l_i = l_i * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # rows with no visible key: acc is 0, so 0
    tl.store(Out + bh * T * D + offs_q[:, None] * D + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=(offs_q[:, None] < T) & d_ok)


def _interpreted() -> bool:
    """Whether kernels run in the Triton interpreter, as fixed when triton.language was imported."""
    from triton.runtime.interpreter import InterpretedFunction

    interpreted = isinstance(tl.zeros, InterpretedFunction)
    if interpreted != triton.knobs.runtime.interpret:
        raise RuntimeError(
            f"TRITON_INTERPRET must be set before triton is first imported: triton was imported "
            f"{'with' if interpreted else 'without'} it, and now it is {'off' if interpreted else 'on'}")
    return interpreted


@functools.cache
def _kernel():
    # wrapped on first use, after _load_triton(); triton.jit picks the interpreter or the compiler
    return triton.jit(_attention_fwd_kernel)


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def triton_tiled(
    q: torch.Tensor,  # (B, h, T, d)
    k: torch.Tensor,  # (B, h, N, d)
    v: torch.Tensor,  # (B, h, N, d)
    key_mask: torch.Tensor | None = None,  # (B, N) bool, True = attend
    causal: bool = False,
    layout=None,  # a TokenLayout; only sliding_window reads it, the rest attend to every visible key
    block_q: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    """FlashAttention-2 forward in Triton; returns (B, h, T, d). Forward only: raises
    NotImplementedError when autograd would need a backward. block_q / block_k: powers of two >= 16."""
    check_inputs(q, k, v, key_mask)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise NotImplementedError("triton_tiled has no backward; use tiled for training")
    if not (_power_of_two(block_q) and _power_of_two(block_k) and min(block_q, block_k) >= 16):
        raise ValueError(f"block_q and block_k must be powers of two >= 16 (tl.dot); got {block_q}, {block_k}")
    _load_triton()
    interpret = _interpreted()
    if q.device.type != "cuda" and not interpret:
        raise RuntimeError(f"triton_tiled got {q.device.type} tensors: use a CUDA device, or set TRITON_INTERPRET=1 "
                           "to run the kernel in the Triton interpreter on the CPU")
    if interpret and q.dtype != torch.float32:
        raise TypeError(f"triton_tiled got {q.dtype}; float32 is required for the Triton interpreter")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"triton_tiled needs q, k, v of one dtype among float32, float16, bfloat16; "
                        f"got {q.dtype}, {k.dtype}, {v.dtype}")

    B, h, T, d = q.shape
    N = k.shape[2]
    q3, k3, v3 = (t.reshape(B * h, -1, d).contiguous() for t in (q, k, v))  # (B*h, T | N, d)
    out = torch.empty_like(q3)
    # int8 rather than bool: one byte per key either way, and loads of i1 pointers are less portable
    mask = key_mask.to(torch.int8).contiguous() if key_mask is not None else q3  # an unread dummy when HAS_MASK is off
    grid = (triton.cdiv(T, block_q), B * h)
    _kernel()[grid](
        q3, k3, v3, mask, out, T, N, h, N - T, d ** -0.5,
        D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_Q=block_q, BLOCK_K=block_k,
        HAS_MASK=key_mask is not None, CAUSAL=causal,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out.reshape(B, h, T, d)
