"""Gradient-weighted relevance of the image patches for one answer (Chefer, Gur & Wolf 2021, "Generic
Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers").

One forward pass with every attention captured and a zero "probe" added to each attention's output,
then the answer's logit is back-propagated: the probe's gradient is the gradient of that attention's
output, so the gradient of its weights is grad(out) vᵀ, and each layer's map is

    Ā = mean over heads of (∇A ⊙ A)⁺  # (T, N): attention that raises the answer, by how much

Relevance starts at the identity (each token is itself) and is carried through the model in the
order it runs:

- a self-attention over x (the ViT over its tokens, the text encoder over the words, the fusion's
  question self-attention): R^{xx} += Ā R^{xx}; the question's relevance on the patches too,
  R^{ti} += Ā R^{ti};
- the question's cross-attention to the patches: R^{ti} += R̄^{tt}ᵀ Ā R̄^{ii}, where R̄ is R with its
  off-diagonal part row-normalised (the paper's rules 10-11; the patches are not updated by the
  question in mmqa's cross fusion, so R^{tt} gains nothing there);
- early fusion's joint self-attention over [fusion token, patches, words] follows the self rule, its
  patch columns then read through the ViT's R̄^{ii}.

The map is what the VQA head reads: the mean over the question's rows of R^{ti} (cross fusion pools
the question by its mean), or the fusion token's row (early fusion), over the patches as a (g, g)
grid. The outputs of the pass are the model's own: the probes are zeros.
"""

from __future__ import annotations

import torch

from mmqa.inspect.capture import AttentionCall, intercept_attention


def layer_map(call: AttentionCall, weight_grad: torch.Tensor) -> torch.Tensor:
    """Ā (T, N) of one captured call of a one-example batch: the head mean of the positive part of
    gradient ⊙ weights; `weight_grad` (1, h, T, N) is the answer's gradient with respect to the weights."""
    return (weight_grad.float() * call.weights().float()).clamp_min(0).mean(1)[0]


def normalised(r: torch.Tensor) -> torch.Tensor:
    """R̄: the part of R beyond the identity with rows summing to 1, plus the identity (rows without
    any relevance yet stay the identity's)."""
    eye = torch.eye(r.shape[0], dtype=r.dtype)
    extra = r - eye
    return extra / extra.sum(-1, keepdim=True).clamp_min(1e-12) + eye


def propagate(layers: list[tuple[str, torch.Tensor]], n_patches: int, prefix: int) -> torch.Tensor:
    """The patch relevance (N,) from each layer's (site, Ā) in the order they ran: the ViT's
    self-attention over prefix + N tokens ("image/..."), the text encoder's ("text/..."), cross
    fusion's question self-attention ("fusion/text_blocks.i/self", T x T) and question -> patch
    attention ("fusion/text_blocks.i/cross", T x N), or early fusion's joint self-attention
    ("fusion/blocks.i/self", 1 + N + T tokens)."""
    r_ii = r_tt = r_ti = r_joint = None

    def eye(n: int) -> torch.Tensor:
        return torch.eye(n, dtype=torch.float64)

    for site, a in layers:
        a = a.double()
        stack, block, kind = site.split("/")
        if stack == "image":
            r_ii = eye(a.shape[0]) if r_ii is None else r_ii
            r_ii = r_ii + a @ r_ii
        elif stack == "text":
            r_tt = eye(a.shape[0]) if r_tt is None else r_tt
            r_tt = r_tt + a @ r_tt
        elif block.startswith("text_blocks"):
            r_tt = eye(a.shape[0]) if r_tt is None else r_tt
            r_ti = a.new_zeros(a.shape[0], n_patches) if r_ti is None else r_ti
            if kind == "self":  # the words mix: so do their relevances on the patches
                r_tt, r_ti = r_tt + a @ r_tt, r_ti + a @ r_ti
            else:  # the words read the patches (T, N)
                r_ti = r_ti + normalised(r_tt).T @ a @ normalised(_patches(r_ii, n_patches, prefix))
        elif block.startswith("blocks"):
            r_joint = eye(a.shape[0]) if r_joint is None else r_joint
            r_joint = r_joint + a @ r_joint
        else:
            raise ValueError(f"no relevance rule for the attention at {site}")
    if r_joint is not None:
        return (r_joint[0, 1:1 + n_patches] @ normalised(_patches(r_ii, n_patches, prefix))).float()
    return r_ti.mean(0).float()


def _patches(r_ii: torch.Tensor | None, n_patches: int, prefix: int) -> torch.Tensor:
    """The patch -> patch block (N, N) of the ViT's relevance (the identity without a captured ViT)."""
    return torch.eye(n_patches, dtype=torch.float64) if r_ii is None else r_ii[prefix:, prefix:]


def weight_gradients(model, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     answer: int) -> list[tuple[AttentionCall, torch.Tensor]]:
    """Every attention call of answering the question `input_ids` (1, T) about `pixels` (1, 3, S, S),
    with the gradient of answer `answer`'s logit with respect to its weights (1, h, T, N). Parameter
    gradients are not touched (the gradient is taken with respect to the probes only)."""
    calls: list[AttentionCall] = []
    probes: list[torch.Tensor] = []

    def probe(call: AttentionCall, out: torch.Tensor) -> torch.Tensor:  # out (1, h, T, d)
        zero = torch.zeros_like(out, requires_grad=True)
        probes.append(zero)
        return out + zero

    with torch.enable_grad(), intercept_attention(model, on_call=calls.append, on_output=probe):
        img = model.encode_images(pixels)
        q = model.encode_text(input_ids, attention_mask)
        logits, _ = model.answer_logits(img, torch.zeros(1, dtype=torch.long, device=pixels.device), q)
        grads = torch.autograd.grad(logits[0, answer], probes, allow_unused=True)
    # out = weights @ v, so d answer / d weights = d answer / d out @ vᵀ
    return [(c, (g if g is not None else torch.zeros_like(p)) @ c.v.transpose(-2, -1))
            for c, g, p in zip(calls, grads, probes)]


def answer_relevance(model, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     answer: int, prefix: int) -> torch.Tensor:
    """The (g, g) relevance of the patches of `pixels` for answer index `answer` to the question;
    `prefix`: the ViT's tokens before the patches (CLS)."""
    layers = [(c.site, layer_map(c, grad).cpu()) for c, grad in weight_gradients(model, pixels, input_ids,
                                                                               attention_mask, answer)]
    g = model.grid
    return propagate(layers, g * g, prefix).reshape(g, g)
