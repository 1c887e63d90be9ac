"""Ingredient prediction scores, as Inverse Cooking reports them: precision, recall, F1 and IoU of
the predicted ingredient sets, accumulated over the whole split (true / false positives and false
negatives are summed over every dish before dividing), plus the ingredient hallucination rate of
generated recipes (the share of dishes whose recipe names an ingredient the image does not show)."""

from __future__ import annotations

import torch
import torchmetrics


def ingredient_scores(tp: float, fp: float, fn: float) -> dict[str, float]:
    """Corpus-level set scores from summed counts; an empty denominator scores 0."""

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else 0.0

    return {
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "iou": ratio(tp, tp + fp + fn),
    }


class IngredientScores(torchmetrics.Metric):
    """Sums of true positives, false positives and false negatives over multi-hot ingredient sets;
    sums reduce correctly across DDP ranks."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("tp", "fp", "fn"):
            self.add_state(name, torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: (B, I) multi-hot (bool or 0/1) sets over the ingredient vocabulary."""
        if pred.shape != target.shape:
            raise ValueError(f"IngredientScores needs pred and target of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
        p, t = pred.bool(), target.bool()
        self.tp += (p & t).sum()
        self.fp += (p & ~t).sum()
        self.fn += (~p & t).sum()

    def compute(self) -> dict[str, torch.Tensor]:
        scores = ingredient_scores(self.tp.item(), self.fp.item(), self.fn.item())
        return {k: torch.tensor(v, device=self.device) for k, v in scores.items()}


class HallucinationRate(torchmetrics.Metric):
    """Share of generated recipes that name at least one ingredient absent from the dish."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("hallucinated", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, named: list[set[str]], present: list[set[str]]) -> None:
        """named[i]: the ingredients recipe i mentions; present[i]: those in its image."""
        if len(named) != len(present):
            raise ValueError(f"HallucinationRate needs one present set per recipe, got {len(named)} and {len(present)}")
        self.hallucinated += sum(bool(n - p) for n, p in zip(named, present))
        self.total += len(named)

    def compute(self) -> torch.Tensor:
        return self.hallucinated / self.total.clamp(min=1)
