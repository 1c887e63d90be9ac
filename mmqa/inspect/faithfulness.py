"""Is a map faithful? Delete (and, separately, insert) image patches in the order the map ranks them
and watch the probability of the model's own answer: a map that points at what the model uses makes
that probability fall fast on deletion and rise fast on insertion (Petsiuk et al. 2018's RISE metrics,
applied to patches).

A deleted patch is set to 0 in the normalised image, i.e. the dataset's mean colour; insertion starts
from an image of only that colour. `curves` evaluates `steps + 1` fractions 0, 1/steps, ..., 1 of the
patches in one batch; the area under each curve (trapezoid over the fraction) summarises it: lower
deletion AUC and higher insertion AUC mean a more faithful map. The `random` method is the baseline
each map must beat.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mmqa.inspect.maps import explain, patch_relevance


@dataclass
class Curves:
    fractions: np.ndarray  # (K + 1,) share of patches deleted / inserted
    deletion: np.ndarray  # (K + 1,) probability of the original answer
    insertion: np.ndarray

    @property
    def deletion_auc(self) -> float:
        return float(np.trapezoid(self.deletion, self.fractions))

    @property
    def insertion_auc(self) -> float:
        return float(np.trapezoid(self.insertion, self.fractions))


def patch_masks(order: torch.Tensor, steps: int) -> torch.Tensor:
    """(steps + 1, N) bool: row k marks the first round(k / steps * N) patches of `order`."""
    n = order.numel()
    counts = torch.round(torch.arange(steps + 1) / steps * n).long()  # (K + 1,)
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)  # position of each patch in the order
    return rank[None, :] < counts[:, None]


@torch.no_grad()
def curves(bundle, pixels: torch.Tensor, question, answer: int, order: torch.Tensor, steps: int) -> Curves:
    """Deletion and insertion curves of one question; `pixels` (1, 3, S, S) normalised, `question` the
    encoded question (an EncoderOutput of one row), `order` (N,) patches most relevant first."""
    model = bundle.model
    g = model.grid
    chosen = patch_masks(order, steps).reshape(-1, 1, g, g).float()  # (K + 1, 1, g, g)
    chosen = torch.nn.functional.interpolate(chosen, size=pixels.shape[-2:], mode="nearest").to(pixels)  # pixel masks
    deleted = pixels * (1 - chosen)  # (K + 1, 3, S, S)
    inserted = pixels * chosen
    img = model.encode_images(torch.cat([deleted, inserted]))
    idx = torch.zeros(img.tokens.shape[0], dtype=torch.long, device=pixels.device)
    rows = question.take(idx)
    logits, _ = model.answer_logits(img, torch.arange(img.tokens.shape[0], device=pixels.device), rows)
    probs = logits[:, answer].sigmoid().cpu().numpy()
    k = steps + 1
    return Curves(np.arange(k) / steps, probs[:k], probs[k:])


def evaluate(bundle, examples, methods: list[str], steps: int, seed: int = 0):
    """(rows, mean curves): one row per (example, method) with the question, the model's answer and both
    AUCs; per method (fractions, mean deletion curve, mean insertion curve). `examples` is an iterable of
    (image path, question)."""
    generator = torch.Generator().manual_seed(seed)
    rows, sums = [], {}
    for image, question in examples:
        ex = explain(bundle, image, question, relevance="chefer" in methods)
        answer = bundle.answers.index(ex.answer)
        for method in methods:
            relevance = patch_relevance(ex, method, generator).flatten()  # (N,)
            c = curves(bundle, ex.pixels, ex.encoded, answer, relevance.argsort(descending=True), steps)
            rows.append({"image": str(image), "question": question, "answer": ex.answer, "method": method,
                         "p_answer": ex.probability, "deletion_auc": c.deletion_auc,
                         "insertion_auc": c.insertion_auc})
            total = sums.setdefault(method, [c.fractions, 0.0, 0.0, 0])
            total[1], total[2], total[3] = total[1] + c.deletion, total[2] + c.insertion, total[3] + 1
    mean = {m: (f, d / n, i / n) for m, (f, d, i, n) in sums.items()}
    return rows, mean


def summarise(rows: list[dict]) -> list[dict]:
    """Per method: mean deletion and insertion AUC (with the standard error over examples), and each
    against the random baseline."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out = []
    base = {k: np.mean([r[k] for r in rows if r["method"] == "random"]) for k in ("deletion_auc", "insertion_auc")} \
        if "random" in methods else None
    for m in methods:
        d = np.array([r["deletion_auc"] for r in rows if r["method"] == m])
        i = np.array([r["insertion_auc"] for r in rows if r["method"] == m])
        se = lambda x: float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")  # noqa: E731
        row = {"method": m, "n": len(d), "deletion_auc": float(d.mean()), "deletion_se": se(d),
               "insertion_auc": float(i.mean()), "insertion_se": se(i)}
        if base is not None:
            row["deletion_vs_random"] = row["deletion_auc"] - float(base["deletion_auc"])
            row["insertion_vs_random"] = row["insertion_auc"] - float(base["insertion_auc"])
        out.append(row)
    return out
