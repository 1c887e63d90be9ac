"""Ingredient prediction scores, as Inverse Cooking reports them: precision, recall, F1 and IoU of
the predicted ingredient sets, accumulated over the whole split (true / false positives and false
negatives are summed over every dish before dividing), also for a grid of thresholds, plus the ingredient hallucination rate of
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
    """Sums of true positives, false positives and false negatives of the sets predicted at
    `threshold`, and at every threshold of `grid` in the same pass: `compute` also gives the best F1
    over the grid and its threshold (on validation, the value to choose for
    `recipe.ingredient_threshold`). Sums reduce correctly across DDP ranks."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, threshold: float = 0.5, grid: tuple[float, ...] = tuple(i / 20 for i in range(1, 20)), **kwargs) -> None:
        super().__init__(**kwargs)
        self.thresholds = sorted({float(threshold), *map(float, grid)})
        self.at = self.thresholds.index(float(threshold))
        for name in ("tp", "fp", "fn"):
            self.add_state(name, torch.zeros(len(self.thresholds)), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        """probs: (B, I) probabilities (or a multi-hot set: 0/1), target: (B, I) multi-hot true sets."""
        if probs.shape != target.shape:
            raise ValueError(f"IngredientScores needs pred and target of one shape, got {tuple(probs.shape)} and {tuple(target.shape)}")
        cuts = torch.tensor(self.thresholds, device=probs.device)[:, None, None]  # (T, 1, 1)
        p = probs.float().unsqueeze(0) >= cuts  # (T, B, I) the set at each threshold
        t = target.bool().unsqueeze(0)  # (1, B, I)
        self.tp += (p & t).sum((1, 2))
        self.fp += (p & ~t).sum((1, 2))
        self.fn += (~p & t).sum((1, 2))

    def compute(self) -> dict[str, torch.Tensor]:
        counts = list(zip(self.tp.tolist(), self.fp.tolist(), self.fn.tolist()))
        scores = ingredient_scores(*counts[self.at])
        f1 = [ingredient_scores(*c)["f1"] for c in counts]
        best = max(range(len(f1)), key=lambda i: (f1[i], -abs(i - self.at)))  # ties: nearest the threshold
        scores.update(best_f1=f1[best], best_threshold=self.thresholds[best])
        return {k: torch.tensor(v, device=self.device) for k, v in scores.items()}


class HallucinationRate(torchmetrics.MeanMetric):
    """Share of generated recipes that name at least one ingredient absent from the dish: the mean,
    over recipes, of "names an absent one" (torchmetrics' `MeanMetric`, summed across DDP ranks)."""

    higher_is_better = False

    def update(self, named: list[set[str]], present: list[set[str]]) -> None:
        """named[i]: the ingredients recipe i mentions; present[i]: those in its image."""
        if len(named) != len(present):
            raise ValueError(f"HallucinationRate needs one present set per recipe, got {len(named)} and {len(present)}")
        super().update(torch.tensor([float(bool(n - p)) for n, p in zip(named, present)]))
