"""Which heads matter (Michel et al. 2019, "Are Sixteen Heads Really Better than One?").

A head mask xi (one number per head, 1 = keep) multiplies each head's output before the heads are
merged and projected, through the capture layer's output hook (`capture.intercept_attention`), so the
model keeps running SDPA (transformers 5 has no `head_mask`). The importance of a head is
E |dL / d xi_h| over a split's batches at xi = 1, with L the VQA loss plus the caption loss (the fusion
only sees the first, the decoder only the second), normalised per attention site by its L2 norm as the
paper does. `pruning_curve` then masks each stack's heads in order of least importance and reports VQA
accuracy, the caption loss (teacher-forced, per token) and BLEU-4 of greedy captions written with the
heads masked, at each fraction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from mmqa.inspect.capture import attention_modules, attention_site, head_count, intercept_attention
from mmqa.metrics.captions import CaptionScores
from mmqa.metrics.vqa import VQAAccuracy
from mmqa.text_generation import generate_captions


def head_counts(model: nn.Module) -> dict[str, int]:
    """{site: number of heads} of every captured attention, in module order."""
    return {attention_site(name, m): head_count(m) for name, m in attention_modules(model)}


@contextlib.contextmanager
def head_mask(model: nn.Module, masks: dict[str, torch.Tensor]) -> Iterator[None]:
    """Multiply each head's output by masks[site][head] (sites not in `masks` run unchanged)."""
    def on_output(call, out: torch.Tensor) -> torch.Tensor:  # (B, h, T, d)
        m = masks.get(call.site)
        return out if m is None else out * m.to(out).view(1, -1, 1, 1)

    with intercept_attention(model, on_output=on_output):
        yield


def _loss(lit, batch) -> torch.Tensor:
    losses, _ = lit.compute_losses(batch)
    return sum(losses[k] for k in ("vqa", "caption") if k in losses)


def importance(lit, batches: Iterable) -> dict[str, torch.Tensor]:
    """{site: (h,) importance}, each site's vector of unit L2 norm."""
    lit.eval()
    masks = {s: torch.ones(h, requires_grad=True) for s, h in head_counts(lit.model).items()}
    total = {s: torch.zeros(h) for s, h in head_counts(lit.model).items()}
    frozen = [p for p in lit.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)  # only the masks' gradients are needed
    try:
        for batch in batches:
            with head_mask(lit.model, masks):
                _loss(lit, batch).backward()
            for s, m in masks.items():
                if m.grad is not None:
                    total[s] += m.grad.abs()
                    m.grad = None
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return {s: t / t.norm().clamp_min(1e-12) for s, t in total.items()}


CAPTION_STACKS = ("image", "decoder")  # the stacks a caption passes through: masking others cannot change it


@torch.no_grad()
def evaluate(lit, batches: Iterable, masks: dict[str, torch.Tensor], captions: bool = True) -> dict[str, float]:
    """VQA accuracy (VQAv2 scoring), the caption loss and, with `captions`, BLEU-4 of the greedy captions
    (the run's `generation` settings) of every image with references, with `masks` applied."""
    lit.eval()
    metric = VQAAccuracy(lit.test_vqa.families)
    scores, written = CaptionScores(), 0
    caption, n = 0.0, 0
    with head_mask(lit.model, masks):
        for batch in batches:
            losses, out = lit.compute_losses(batch)
            if "vqa_logits" in out:
                metric.update([lit.answers[i] for i in out["vqa_logits"].argmax(-1).tolist()], batch.q_answers,
                              batch.q_families)
            if "caption" in losses:
                caption, n = caption + float(losses["caption"]), n + 1
            rows = [i for i, refs in enumerate(batch.refs) if refs] if captions else []
            if rows and "img" in out:
                hyps = generate_captions(lit.model, lit.dec_tok, out["img"].take(rows), **lit.generation)
                scores.update([str(batch.image_ids[i].item()) for i in rows], hyps, [batch.refs[i] for i in rows])
                written += len(rows)
    bleu = float(scores.compute()["bleu4"]) if written else float("nan")
    return {"vqa_acc": float(metric.compute()["vqa_acc"]), "caption_loss": caption / max(n, 1), "bleu4": bleu}


def ranked(scores: dict[str, torch.Tensor], stack: str) -> list[tuple[str, int, float]]:
    """(site, head, importance) of one stack's heads, least important first."""
    heads = [(s, h, float(v)) for s, vec in scores.items() if s.split("/")[0] == stack for h, v in enumerate(vec)]
    return sorted(heads, key=lambda x: x[2])


def masks_without(counts: dict[str, int], dropped: list[tuple[str, int, float]]) -> dict[str, torch.Tensor]:
    masks = {s: torch.ones(h) for s, h in counts.items()}
    for site, head, _ in dropped:
        masks[site][head] = 0.0
    return masks


def pruning_curve(lit, batches: list, scores: dict[str, torch.Tensor], fractions: list[float]) -> list[dict]:
    """Per stack and fraction: mask that share of the stack's heads, least important first, and evaluate."""
    counts = head_counts(lit.model)
    rows = []
    bleu = evaluate(lit, batches, {})["bleu4"]  # what the stacks a caption does not pass through leave it at
    for stack in dict.fromkeys(s.split("/")[0] for s in counts):
        order = ranked(scores, stack)
        for f in fractions:
            k = round(f * len(order))
            captions = stack in CAPTION_STACKS
            result = evaluate(lit, batches, masks_without(counts, order[:k]), captions)
            result["bleu4"] = result["bleu4"] if captions else bleu
            rows.append({"stack": stack, "fraction": f, "heads_masked": k, "heads": len(order), **result,
                         "masked": " ".join(f"{s}:h{h}" for s, h, _ in order[:k])})
    return rows
