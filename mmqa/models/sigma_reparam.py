"""σReparam (Zhai et al. 2023, "Stabilizing Transformer Training by Preventing Attention Entropy
Collapse"): every attention projection's weight (in the fusion, the ViT, BERT and GPT-2) W is used as W_hat = (gamma / sigma(W)) W, where sigma(W)
is W's spectral norm, estimated by one step of power iteration per training forward (u, v kept as
buffers, as in `torch.nn.utils.spectral_norm`), and gamma a learnt scalar. The logits q . k can then only
grow through gamma, which bounds the entropy collapse the paper shows precedes divergence.

gamma starts at sigma(W) of the initial weight (u, v converged first), so switching σReparam on leaves
the initial model's function unchanged. A fused projection (timm's qkv, mmqa's kv) is normalised as one
matrix; it is applied with `torch.nn.utils.parametrize` (the state dict holds
`parametrizations.weight.original`, `.gamma`, `.u`, `.v`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from transformers.models.bert.modeling_bert import BertSelfAttention
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

from mmqa.models.fusion.anchored import AnchoredCrossAttention
from mmqa.models.layers import Attention
from mmqa.models.vit_attention import TimmAttention

# the projections reparametrised, per attention module (GPT-2's Conv1D weights are (in, out): sigma is the same)
PROJECTIONS = {
    Attention: ("q", "kv", "out"),  # mmqa's fusion
    AnchoredCrossAttention: ("q", "kv", "out"),  # anchored fusion's cross-attention (its anchor, gate and read map stay)
    TimmAttention: ("qkv", "proj"),  # the ViT
    BertSelfAttention: ("query", "key", "value"),  # BERT / MiniLM (its output projection sits in another module)
    GPT2Attention: ("q_attn", "c_attn", "c_proj"),  # q_attn: cross-attention only
}


class SigmaReparam(nn.Module):
    def __init__(self, weight: torch.Tensor, iterations: int = 50):  # weight (out, in)
        super().__init__()
        w = weight.detach()
        u = F.normalize(torch.randn(w.shape[0], generator=torch.Generator().manual_seed(0)).to(w), dim=0)
        for _ in range(iterations):  # converge once, so that gamma / sigma = 1 at the start
            v = F.normalize(w.T @ u, dim=0)
            u = F.normalize(w @ v, dim=0)
        self.register_buffer("u", u)  # (out,)
        self.register_buffer("v", v)  # (in,)
        self.gamma = nn.Parameter(u @ w @ v)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():  # one power-iteration step: u, v track W's top singular vectors
                self.v.copy_(F.normalize(weight.T @ self.u, dim=0))
                self.u.copy_(F.normalize(weight @ self.v, dim=0))
        sigma = self.u.clone() @ weight @ self.v.clone()  # differentiable in W; u, v held fixed (cloned: updated in place)
        return weight * (self.gamma / sigma)


def apply_sigma_reparam(model: nn.Module) -> int:
    """Reparametrise the projections of every attention module in `model` (mmqa's, the ViT's, BERT's,
    GPT-2's); returns how many projections."""
    n = 0
    for module in list(model.modules()):
        for kind, names in PROJECTIONS.items():
            if isinstance(module, kind):
                for layer in (getattr(module, name) for name in names if hasattr(module, name)):
                    parametrize.register_parametrization(layer, "weight", SigmaReparam(layer.weight))
                    n += 1
    return n
