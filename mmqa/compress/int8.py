"""Dynamic INT8 linear layers: weights stored as int8 with one fp32 scale per output channel
(symmetric, zero point 0), activations quantized at run time, int8 x int8 products summed in int32.

`quantize_int8(model)` swaps every `nn.Linear` and every transformers `Conv1D` (GPT-2's projections,
whose weight is stored transposed) for an `Int8Linear`; embeddings, norms and convolutions stay fp32.
`quantize_int8(model, empty=True)` builds the same structure without weights, for `Bundle.load` to
fill from the bundle's safetensors (`weight` int8, `weight_scale` fp32, `bias` fp32).

Two kernels compute the same product (`KERNELS`):
- `fbgemm`: PyTorch's x86 dynamic quantized linear (`quantized::linear_dynamic`, FBGEMM / oneDNN):
  per-tensor activation scale, weights packed once on first use; activations over 7 bits
  (`reduce_range`, which AVX2's 16-bit accumulation needs) unless the CPU has VNNI, whose int8 dot
  products sum in 32 bits, and then over 8 (as PyTorch's own x86 qconfig decides);
- `int_mm`: a per-row activation scale over 8 bits and `torch._int_mm` (CUDA's int8 tensor cores;
  it also runs on CPU).
`auto` takes fbgemm on CPU and int_mm elsewhere. benchmarks/serving.py measures both against fp32
(docs/compression.md). fbgemm's packing goes through PyTorch's quantized tensors, which PyTorch
deprecates (a warning we silence; torch is pinned): int_mm is the path that will stay.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

KERNELS = ("auto", "fbgemm", "int_mm")
QMAX = 127  # symmetric int8: -127 .. 127 (-128 unused, so that negation stays in range)
REDUCE_RANGE = not torch.cpu._is_vnni_supported()  # fbgemm: 7-bit activations only without VNNI


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (out, in) int8 and (out,) fp32 scales, one per output channel."""
    scale = weight.detach().abs().amax(dim=1).float().clamp_min(1e-12) / QMAX  # (out,)
    q = torch.round(weight.detach().float() / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """y = x W^T + b with W in int8; `weight`, `weight_scale` and `bias` are buffers, never trained."""

    def __init__(self, in_features: int, out_features: int, bias: bool, kernel: str = "auto"):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel={kernel!r}: valid kernels are {', '.join(KERNELS)}")
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed = None  # fbgemm's packed weight, made on first use (not saved)

    @classmethod
    def from_float(cls, module: nn.Module, kernel: str = "auto", empty: bool = False) -> "Int8Linear":
        """From an `nn.Linear` or a transformers `Conv1D`; `empty`: shapes only (weights come later)."""
        weight = module.weight.t() if isinstance(module, Conv1D) else module.weight  # (out, in)
        layer = cls(weight.shape[1], weight.shape[0], module.bias is not None, kernel)
        if not empty:
            layer.weight, layer.weight_scale = quantize_weight(weight)
            if module.bias is not None:
                layer.bias = module.bias.detach().float().clone()
        return layer.to(weight.device)

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None  # new weights: pack again
        super()._load_from_state_dict(*args, **kwargs)

    def dequantized(self) -> torch.Tensor:  # (out, in) fp32: what the int8 weight stands for
        return self.weight.float() * self.weight_scale[:, None]

    def resolved_kernel(self, device: torch.device) -> str:
        if self.kernel != "auto":
            return self.kernel
        return "fbgemm" if device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines else "int_mm"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features).float()  # (M, in)
        if self.resolved_kernel(x.device) == "fbgemm":
            y = torch.ops.quantized.linear_dynamic(x, self._fbgemm_weight(), REDUCE_RANGE)  # bias added inside
        else:
            y = self._int_mm(x)
        return y.reshape(*shape[:-1], self.out_features).to(dtype)

    def _fbgemm_weight(self):
        if self._packed is None:
            zero = torch.zeros(self.out_features, dtype=torch.long)
            with warnings.catch_warnings():  # PyTorch deprecates quantized tensors; torch is pinned (pyproject.toml)
                warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
                qweight = torch._make_per_channel_quantized_tensor(self.weight, self.weight_scale.double(), zero, 0)
            self._packed = torch.ops.quantized.linear_prepack(qweight, self.bias)
        return self._packed

    def _int_mm(self, x: torch.Tensor) -> torch.Tensor:  # (M, in) -> (M, out)
        x_scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / QMAX  # (M, 1)
        xq = torch.round(x / x_scale).clamp(-QMAX, QMAX).to(torch.int8)
        m = xq.shape[0]
        if x.is_cuda and (m <= 16 or self.in_features % 8 or self.out_features % 8):
            # cuBLAS's int8 GEMM needs M > 16 and K, N multiples of 8: the same integer sum in fp32
            # (exact while in_features * 127^2 < 2^24, i.e. in_features < 1040)
            acc = xq.float() @ self.weight.float().t()
        else:
            acc = torch._int_mm(xq, self.weight.t()).float()  # (M, out) int32 sums
        y = acc * x_scale * self.weight_scale  # (M, out)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, kernel={self.kernel}"


def quantize_int8(model: nn.Module, kernel: str = "auto", empty: bool = False) -> int:
    """Swap every Linear and Conv1D of `model` for an Int8Linear, in place; returns how many."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    for name, module in targets:
        model.set_submodule(name, Int8Linear.from_float(module, kernel, empty))
    return len(targets)


def set_kernel(model: nn.Module, kernel: str) -> None:
    """Run every Int8Linear of `model` with `kernel` (benchmarks and tests compare them)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}: valid kernels are {', '.join(KERNELS)}")
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.kernel = kernel
