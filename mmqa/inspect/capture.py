"""One capture layer for every attention mmqa runs: `with capture_attention(model) as calls: model(...)`.

Inside the block each attention call appends an `AttentionCall`: its module path, where it sits
(`site`: stack / layer / self or cross), its queries and keys (B, h, T|N, d), which keys each query
may see, and the function that computed it, so the weights it applied can be materialised afterwards
(`weights()`) exactly as that function applies them. The output of every attention is still computed by
the function the model runs (SDPA by default): the capture only listens, so outputs are bit-identical
with and without it, and on exit every module is as before. Outside the block it costs nothing.

Covered: mmqa's own `layers.Attention` (fusion), anchored fusion's `AnchoredCrossAttention` (its
logit bias is recorded with the call) and the ViT's swapped `TimmAttention` (their `attend` function
is wrapped), and transformers' attention modules, such as BERT / MiniLM in the text encoder
and GPT-2's self- and cross-attention in the decoder (the module's own config copy is pointed at
`mmqa_capture`, registered in transformers' `AttentionInterface`, which delegates to the
implementation the model was running). `uncovered(model)` names the attentions it cannot see
(open_clip's towers, a named timm model's own attention classes).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import re
import sys
from collections.abc import Callable, Iterator

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from mmqa.models.attention.binding import attention_weights
from mmqa.models.attention.dense import visibility
from mmqa.models.attention.sliding_window import TokenLayout
from mmqa.models.fusion.anchored import AnchoredCrossAttention, sink_softmax
from mmqa.models.layers import Attention
from mmqa.models.vit_attention import TimmAttention

CAPTURE = "mmqa_capture"  # the name under which the capture is registered in transformers' AttentionInterface
STACKS = {"image_encoder": "image", "text_encoder": "text", "fusion": "fusion", "decoder": "decoder"}
MMQA_ATTENTION = (Attention, AnchoredCrossAttention, TimmAttention)  # mmqa's modules with an `attend` function


@dataclasses.dataclass
class AttentionCall:
    """One attention call, captured: enough to rebuild the weights it applied."""

    name: str  # module path in the model, e.g. "fusion.text_blocks.0.cross_attn"
    site: str  # stack / layer / kind, e.g. "fusion/text_blocks.0/cross", "image/blocks.2/self"
    q: torch.Tensor  # (B, h, T, d), detached
    k: torch.Tensor  # (B, h, N, d), detached
    visible: torch.Tensor | None  # bool, broadcastable to (B, h, T, N); None: every key
    scale: float  # the logits are (q . k) * scale
    fn: Callable | None = None  # mmqa's attention function (weights by `binding.attention_weights`); None: softmax
    key_mask: torch.Tensor | None = None  # (B, N) bool, for `fn`
    causal: bool = False
    layout: TokenLayout | None = None
    v: torch.Tensor | None = None  # (B, h, N, d) the values, detached: the gradient of the weights is grad(out) vᵀ
    bias: torch.Tensor | None = None  # (B, h, T, N) added to the logits (anchored fusion's offset bias), detached
    sink: torch.Tensor | None = None  # (B, h, T) the logit of a null key whose weight is dropped (anchored `sink`), detached

    @property
    def stack(self) -> str:
        return self.site.split("/")[0]

    @property
    def query_mask(self) -> torch.Tensor | None:
        """(B, T) bool, the real queries: known for self-attention over a masked sequence, else None."""
        if self.key_mask is not None and self.q.shape[2] == self.k.shape[2] and "/self" in self.site:
            return self.key_mask
        return None

    def scores(self) -> torch.Tensor:  # (B, h, T, N): the logits before masking
        scores = (self.q @ self.k.transpose(-2, -1)) * self.scale
        return scores if self.bias is None else scores + self.bias

    def logits(self) -> torch.Tensor:  # (B, h, T, N), -inf where a key is not visible
        scores = self.scores()
        return scores if self.visible is None else scores.masked_fill(~self.visible, float("-inf"))

    def weights(self) -> torch.Tensor:  # (B, h, T, N): what multiplies the values
        if self.fn is not None and self.bias is None and self.sink is None:
            return attention_weights(self.fn, self.q, self.k, self.key_mask, self.causal, self.layout)
        return sink_softmax(self.scores(), self.visible, self.sink)


OnCall = Callable[[AttentionCall], None]
OnOutput = Callable[[AttentionCall, torch.Tensor], torch.Tensor]  # (call, out (B, h, T, d)) -> out


def site_of(name: str, kind: str) -> str:
    """"fusion.text_blocks.0.cross_attn" -> "fusion/text_blocks.0/cross": the stack, the numbered block
    the module sits in (its container and index), and self or cross."""
    parts = name.split(".")
    stack = STACKS.get(parts[0], parts[0])
    layer = next((f"{parts[i - 1]}.{p}" for i, p in enumerate(parts) if p.isdigit() and i > 0), "-")
    return f"{stack}/{layer}/{kind}"


def head_count(module: nn.Module) -> int:
    """The number of heads of an attention module, under whichever name its library gives it."""
    return next(getattr(module, a) for a in ("heads", "num_heads", "num_attention_heads") if hasattr(module, a))


def attention_site(name: str, module: nn.Module) -> str:
    """The site of an attention module at path `name`: cross when it reads another sequence (mmqa's
    `cross_attn`, GPT-2's cross-attention), else self."""
    cross = name.endswith("cross_attn") or getattr(module, "is_cross_attention", False) or "crossattention" in name
    return site_of(name, "cross" if cross else "self")


def stack_of(name: str) -> str:
    """The stack of a parameter or module path of MMQAModel; everything else (heads, projections) is "heads"."""
    return STACKS.get(name.split(".")[0], "heads")


def block_of(name: str) -> str | None:
    """"image_encoder.vit.blocks.2.mlp.fc2.weight" -> "image/blocks.2"; None outside the four stacks'
    numbered modules."""
    site = site_of(name, "x")
    return None if "/-/" in site or stack_of(name) == "heads" else site.rsplit("/", 1)[0]


def find_blocks(model: nn.Module, stacks: set[str]) -> list[tuple[str, nn.Module]]:
    """The transformer blocks: children of a ModuleList / Sequential that hold a captured attention."""
    attention = [n for n, _ in attention_modules(model)]
    found = []
    for name, container in model.named_modules():
        if isinstance(container, (nn.ModuleList, nn.Sequential)) and stack_of(name) in stacks:
            for i, child in enumerate(container):
                path = f"{name}.{i}"
                if any(a.startswith(path + ".") for a in attention):
                    found.append((path, child))
    return found


# --------------------------------------------------------------------------- mmqa's own attention


def _probe_mmqa(name: str, module: nn.Module, record: OnCall | None, transform: OnOutput | None) -> Callable:
    original = module.attend
    site = attention_site(name, module)

    @functools.wraps(original)  # sets __wrapped__: binding.unbound still sees the configured variant
    def probe(q, k, v, key_mask=None, causal=False, layout=None, **kwargs):
        visible = visibility(key_mask, causal, q.shape[2], k.shape[2], q.device)
        bias, sink = kwargs.get("bias"), kwargs.get("sink")
        call = AttentionCall(name, site, q.detach(), k.detach(), visible, q.shape[-1] ** -0.5,
                             fn=original, key_mask=key_mask, causal=causal, layout=layout, v=v.detach(),
                             bias=None if bias is None else bias.detach(), sink=None if sink is None else sink.detach())
        if record is not None:
            record(call)
        out = original(q, k, v, key_mask=key_mask, causal=causal, layout=layout, **kwargs)  # (B, h, T, d)
        return out if transform is None else transform(call, out)

    module.attend = probe
    return original


# --------------------------------------------------------------------------- transformers' attention


def _is_hf_attention(module: nn.Module) -> bool:
    """A transformers attention module: it dispatches through `config._attn_implementation`."""
    return hasattr(getattr(module, "config", None), "_attn_implementation") and hasattr(module, "is_causal") \
        and any(hasattr(module, a) for a in ("scaling", "scale_attn_weights"))


def _hf_visible(module: nn.Module, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool | None) -> torch.Tensor | None:
    """The keys each query sees, from what transformers passed: a bool mask (True = attend), an additive
    float mask, or None with the module's causality (as `sdpa_attention_forward` decides it)."""
    T, N = query.shape[2], key.shape[2]
    if mask is not None:
        mask = mask[..., :N]
        return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return visibility(None, bool(causal) and T > 1, T, N, query.device)


def _capture_forward(module, query, key, value, attention_mask, **kwargs):
    """Registered as `mmqa_capture`: record, run the implementation the model was configured with,
    hand its output to the transform."""
    record, transform, name, implementation = module._mmqa_capture
    visible = _hf_visible(module, query, key, attention_mask, kwargs.get("is_causal"))
    scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
    if visible is not None and visible.dim() == 2:
        visible = visible[None, None]
    call = AttentionCall(name, attention_site(name, module), query.detach(), key.detach(), visible, scale,
                         v=value.detach())
    if record is not None:
        record(call)
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    run = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)
    out, weights = run(module, query, key, value, attention_mask, **kwargs)  # out (B, T, h, d)
    if transform is not None:
        out = transform(call, out.transpose(1, 2)).transpose(1, 2)
    return out, weights


AttentionInterface.register(CAPTURE, _capture_forward)


def _probe_hf(name: str, module: nn.Module, record: OnCall | None, transform: OnOutput | None) -> object:
    original = module.config
    module._mmqa_capture = (record, transform, name, original._attn_implementation)
    # a copy of the config for this module only: the model's masks are still built for its own implementation
    module.config = copy.copy(original)
    module.config._attn_implementation = CAPTURE
    return original


# --------------------------------------------------------------------------- the context manager


def attention_modules(model: nn.Module, include: str | None = None) -> list[tuple[str, nn.Module]]:
    """(path, module) of every attention the capture covers, optionally only paths matching `include`
    (a regular expression searched in the path)."""
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, MMQA_ATTENTION) or _is_hf_attention(m)]
    return [(n, m) for n, m in found if include is None or re.search(include, n)]


def uncovered(model: nn.Module) -> list[str]:
    """Paths of attention modules the capture cannot see (not mmqa's, not transformers'): open_clip's
    towers, a named timm model's own attention classes."""
    covered = [n for n, _ in attention_modules(model)]

    def related(n: str) -> bool:  # the module, inside it, or around it (BERT's BertAttention wraps its self-attention)
        return any(n == c or n.startswith(c + ".") or c.startswith(n + ".") for c in covered)

    return [n for n, m in model.named_modules()
            if (isinstance(m, nn.MultiheadAttention) or type(m).__name__.endswith("Attention")) and not related(n)]


@contextlib.contextmanager
def intercept_attention(model: nn.Module, include: str | None = None, on_call: OnCall | None = None,
                        on_output: OnOutput | None = None) -> Iterator[None]:
    """While the block runs, every covered attention of `model` (or those whose path matches `include`)
    hands its call to `on_call`, and its output (B, h, T, d), before the heads are merged and projected,
    to `on_output`, which may return another (a head mask: mmqa/inspect/heads.py)."""
    restore: list[tuple[nn.Module, str, object]] = []
    try:
        for name, module in attention_modules(model, include):
            if isinstance(module, MMQA_ATTENTION):
                restore.append((module, "attend", _probe_mmqa(name, module, on_call, on_output)))
            else:
                restore.append((module, "config", _probe_hf(name, module, on_call, on_output)))
        yield
    finally:
        for module, attribute, original in restore:
            setattr(module, attribute, original)
            if attribute == "config":
                del module._mmqa_capture


@contextlib.contextmanager
def capture_attention(
    model: nn.Module, include: str | None = None, on_call: OnCall | None = None
) -> Iterator[list[AttentionCall]]:
    """Capture every covered attention of `model` (or those whose path matches `include`) while the
    block runs. Calls are appended to the yielded list, or handed to `on_call` instead (to reduce them
    on the fly and keep no tensors)."""
    calls: list[AttentionCall] = []
    with intercept_attention(model, include, on_call=on_call or calls.append):
        yield calls
