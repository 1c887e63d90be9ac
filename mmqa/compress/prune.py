"""Structured pruning: whole attention heads and whole FFN neurons removed, so the weight matrices
themselves get smaller (not zeroed, as `torch.nn.utils.prune` does).

Every transformer mmqa builds is covered, each through its own attribute names:
- attention (heads): mmqa's fusion `Attention` (q, kv, out), anchored fusion's cross-attention (the
  same, plus its per-head anchor, offset gate and position read), the ViT's `TimmAttention` (qkv, proj),
  transformers' BERT self-attention (query, key, value; the output projection is the parent's
  `output.dense`) and GPT-2's self- and cross-attention (Conv1D c_attn / q_attn, c_proj);
- FFN (neurons): mmqa's `MLP`, timm's `Mlp` (fc1, fc2), BERT's layer (intermediate.dense,
  output.dense) and GPT-2's `GPT2MLP` (c_fc, c_proj).

`prune(model, heads, neurons)` keeps the listed heads / neurons of each module, in place, and returns
the new sizes, `{"heads": {module path: n}, "hidden": {path: n}}` (and `"anchored": {path: n}`, the
biased heads left in an anchored cross-attention), which the bundle's config records; `Bundle.load`
calls `resize` with those counts alone to build the smaller shapes before the weights load. Which
heads and neurons to keep is decided by `rank_*` below.
"""

from __future__ import annotations

import torch
from timm.layers import Mlp as TimmMlp
from torch import nn
from transformers.models.bert.modeling_bert import BertLayer, BertSelfAttention
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP, GPT2Attention
from transformers.pytorch_utils import Conv1D

from mmqa.inspect.capture import head_count
from mmqa.models.fusion.anchored import OFFSET_FEATURES, AnchoredCrossAttention
from mmqa.models.layers import MLP, Attention
from mmqa.models.vit_attention import TimmAttention

ATTENTION = (Attention, AnchoredCrossAttention, TimmAttention, BertSelfAttention, GPT2Attention)
FFN = (MLP, TimmMlp, BertLayer, GPT2MLP)


# ----------------------------------------------------------------------------- smaller layers
def _like(new: nn.Module, old: nn.Module) -> nn.Module:
    """`new` on `old`'s device, trained or frozen as `old` was (a frozen tower stays frozen when pruned)."""
    return new.to(old.weight.device).requires_grad_(old.weight.requires_grad)


def _out_features(layer: nn.Module, idx: torch.Tensor) -> nn.Module:
    """A copy of a Linear / Conv1D keeping only output features `idx`."""
    if isinstance(layer, Conv1D):  # weight (in, out)
        new = Conv1D(len(idx), layer.weight.shape[0])
        new.weight.data, new.bias.data = layer.weight.data[:, idx].clone(), layer.bias.data[idx].clone()
    else:
        new = nn.Linear(layer.in_features, len(idx), bias=layer.bias is not None)
        new.weight.data = layer.weight.data[idx].clone()
        if layer.bias is not None:
            new.bias.data = layer.bias.data[idx].clone()
    return _like(new, layer)


def _in_features(layer: nn.Module, idx: torch.Tensor) -> nn.Module:
    """A copy of a Linear / Conv1D keeping only input features `idx` (its bias unchanged)."""
    if isinstance(layer, Conv1D):
        new = Conv1D(layer.weight.shape[1], len(idx))
        new.weight.data, new.bias.data = layer.weight.data[idx].clone(), layer.bias.data.clone()
    else:
        new = nn.Linear(len(idx), layer.out_features, bias=layer.bias is not None)
        new.weight.data = layer.weight.data[:, idx].clone()
        if layer.bias is not None:
            new.bias.data = layer.bias.data.clone()
    return _like(new, layer)


def _features(keep: list[int], heads: int, head_dim: int, groups: int = 1) -> torch.Tensor:
    """Feature indices of heads `keep` in a projection laid out as (groups, heads, head_dim)."""
    return torch.tensor([g * heads * head_dim + h * head_dim + j
                         for g in range(groups) for h in keep for j in range(head_dim)], dtype=torch.long)


# ----------------------------------------------------------------------------- heads
def _head_dim(module: nn.Module) -> int:
    if isinstance(module, (Attention, AnchoredCrossAttention)):
        return module.q.out_features // module.heads
    if isinstance(module, BertSelfAttention):
        return module.attention_head_size
    return module.head_dim  # TimmAttention, GPT2Attention


def keep_heads(model: nn.Module, path: str, keep: list[int]) -> None:
    """Remove every head of the attention at `path` but `keep` (indices in the current order)."""
    m = model.get_submodule(path)
    h, d = head_count(m), _head_dim(m)
    if not keep:
        raise ValueError(f"{path}: an attention needs at least one head")
    one, two, three = _features(keep, h, d), _features(keep, h, d, 2), _features(keep, h, d, 3)
    if isinstance(m, (Attention, AnchoredCrossAttention)):
        m.q, m.kv, m.out = _out_features(m.q, one), _out_features(m.kv, two), _in_features(m.out, one)
        if isinstance(m, AnchoredCrossAttention):  # per head: an anchor (2), its reads (4, 5 with a sink), a gate if biased
            biased = [i for i in keep if i < m.anchored]  # the biased heads stay first: keep is sorted
            m.anchor = _out_features(m.anchor, _features(keep, h, 2))
            m.read = _in_features(m.read, _features(keep, h, m.reads))
            m.gate = _out_features(m.gate, _features(biased, m.anchored, OFFSET_FEATURES))
            if m.sink is not None:
                m.sink = _out_features(m.sink, _features(keep, h, 1))
            m.anchored = len(biased)
        m.heads = len(keep)
    elif isinstance(m, TimmAttention):
        m.qkv, m.proj = _out_features(m.qkv, three), _in_features(m.proj, one)
        if isinstance(m.norm, nn.LayerNorm):  # timm's scale_norm: a LayerNorm over the merged heads
            m.norm = _layer_norm(m.norm, one)
        m.num_heads, m.attn_dim = len(keep), len(keep) * d
    elif isinstance(m, BertSelfAttention):
        m.query, m.key, m.value = (_out_features(layer, one) for layer in (m.query, m.key, m.value))
        output = model.get_submodule(path.rsplit(".", 1)[0]).output  # BertAttention.output: BertSelfOutput
        output.dense = _in_features(output.dense, one)
        m.num_attention_heads, m.all_head_size = len(keep), len(keep) * d
    elif isinstance(m, GPT2Attention):
        if m.is_cross_attention:
            m.q_attn, m.c_attn = _out_features(m.q_attn, one), _out_features(m.c_attn, two)
        else:
            m.c_attn = _out_features(m.c_attn, three)
        m.c_proj = _in_features(m.c_proj, one)
        m.num_heads, m.split_size = len(keep), len(keep) * d
    else:
        raise TypeError(f"{path}: cannot prune the heads of a {type(m).__name__}")


def _layer_norm(norm: nn.LayerNorm, idx: torch.Tensor) -> nn.LayerNorm:
    new = nn.LayerNorm(len(idx), eps=norm.eps)
    new.weight.data, new.bias.data = norm.weight.data[idx].clone(), norm.bias.data[idx].clone()
    return _like(new, norm)


# ----------------------------------------------------------------------------- FFN neurons
def ffn_layers(m: nn.Module) -> tuple[str, str]:
    """(attribute path of the layer into the hidden units, of the layer out of them)."""
    if isinstance(m, MLP):
        return "net.0", "net.3"
    if isinstance(m, TimmMlp):
        return "fc1", "fc2"
    if isinstance(m, BertLayer):
        return "intermediate.dense", "output.dense"
    if isinstance(m, GPT2MLP):
        return "c_fc", "c_proj"
    raise TypeError(f"cannot prune the FFN neurons of a {type(m).__name__}")


def hidden_size(m: nn.Module) -> int:
    first = m.get_submodule(ffn_layers(m)[0])
    return first.weight.shape[1] if isinstance(first, Conv1D) else first.out_features


def keep_neurons(model: nn.Module, path: str, keep: list[int]) -> None:
    """Remove every hidden unit of the FFN at `path` but `keep`."""
    m = model.get_submodule(path)
    first, second = ffn_layers(m)
    if not keep:
        raise ValueError(f"{path}: an FFN needs at least one hidden unit")
    idx = torch.tensor(keep, dtype=torch.long)
    m.set_submodule(first, _out_features(m.get_submodule(first), idx))
    m.set_submodule(second, _in_features(m.get_submodule(second), idx))
    if isinstance(m, TimmMlp) and isinstance(m.norm, nn.LayerNorm):
        m.norm = _layer_norm(m.norm, idx)


# ----------------------------------------------------------------------------- the whole model
def prunable(model: nn.Module) -> tuple[list[str], list[str]]:
    """(paths of the attentions, paths of the FFNs) this module can shrink."""
    heads = [n for n, m in model.named_modules() if isinstance(m, ATTENTION)]
    ffns = [n for n, m in model.named_modules() if isinstance(m, FFN)]
    return heads, ffns


def prune(model: nn.Module, heads: dict[str, list[int]], neurons: dict[str, list[int]]) -> dict:
    """Keep `heads[path]` of each attention and `neurons[path]` of each FFN; returns the new sizes."""
    for path, keep in heads.items():
        keep_heads(model, path, sorted(keep))
    for path, keep in neurons.items():
        keep_neurons(model, path, sorted(keep))
    sizes = {"heads": {p: len(k) for p, k in heads.items()}, "hidden": {p: len(k) for p, k in neurons.items()}}
    anchored = {p: model.get_submodule(p).anchored for p in heads
                if isinstance(model.get_submodule(p), AnchoredCrossAttention)}
    return {**sizes, "anchored": anchored} if anchored else sizes


def resize(model: nn.Module, sizes: dict) -> None:
    """The structure `prune` left, rebuilt from its recorded sizes (the weights are loaded after)."""
    heads = {p: list(range(n)) for p, n in sizes.get("heads", {}).items()}
    for p, biased in sizes.get("anchored", {}).items():  # `biased` of the first heads, the rest unbiased
        first = model.get_submodule(p).anchored
        heads[p] = list(range(biased)) + list(range(first, first + len(heads[p]) - biased))
    prune(model, heads, {p: list(range(n)) for p, n in sizes.get("hidden", {}).items()})


# ----------------------------------------------------------------------------- what to keep
def rank_neurons(model: nn.Module, fraction: float) -> dict[str, list[int]]:
    """For every FFN, the neurons to keep after removing `fraction` of them, by weight magnitude:
    a neuron's score is |its row into the hidden layer| x |its column out of it| (L2 norms)."""
    keep = {}
    for path in prunable(model)[1]:
        m = model.get_submodule(path)
        first, second = (m.get_submodule(p) for p in ffn_layers(m))
        w_in = first.weight.detach().t() if isinstance(first, Conv1D) else first.weight.detach()  # (hidden, in)
        w_out = second.weight.detach() if isinstance(second, Conv1D) else second.weight.detach().t()  # (hidden, out)
        score = w_in.norm(dim=1) * w_out.norm(dim=1)  # (hidden,)
        n = len(score) - round(fraction * len(score))
        keep[path] = score.topk(max(n, 1)).indices.tolist()
    return keep


def rank_heads(scores: dict[str, torch.Tensor], stacks: dict[str, str], fraction: float) -> dict[str, list[int]]:
    """The heads to keep per attention after removing `fraction` of each stack's heads, least
    important first (Michel et al. 2019 rank heads across layers); every attention keeps one head.
    `scores`: {path: (h,) importance}; `stacks`: {path: stack name}."""
    keep = {p: set(range(len(s))) for p, s in scores.items()}
    for stack in dict.fromkeys(stacks.values()):
        ranked = sorted((float(v), p, h) for p, s in scores.items() if stacks[p] == stack for h, v in enumerate(s))
        drop = round(fraction * len(ranked))
        for _, p, h in ranked:
            if drop == 0:
                break
            if len(keep[p]) > 1:
                keep[p].discard(h)
                drop -= 1
    return {p: sorted(k) for p, k in keep.items()}
