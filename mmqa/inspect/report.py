"""What `python -m mmqa inspect` writes into its folder: `report.md`, PNGs and a CSV of every number shown.

- task=example: `vit_heads.png` (CLS -> patch attention, ViT layer x head), `question_heads.png`
  (question -> patch attention, fusion layer x head, mean over the question's tokens), `question_tokens.png`
  (the last fusion layer, one panel a token, mean over heads), `methods.png` (the relevance map of each
  faithfulness method), `maps.csv` (site, head, token, row, col, weight);
- task=faithfulness: `faithfulness.csv` (one row per example and method), `summary.csv`, `curves.png`
  (mean deletion and insertion curves per method).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmqa.atomic import write_atomic
from mmqa.figures import new_figure
from mmqa.inspect.maps import METHODS, Explanation, InspectError, patch_relevance


def _csv(rows: list[dict]) -> str:
    f = io.StringIO()
    if rows:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return f.getvalue()


def _png(fig) -> bytes:
    f = io.BytesIO()
    fig.savefig(f, format="png", dpi=90)
    return f.getvalue()


def _grid_figure(image: np.ndarray, panels: list[list[tuple[str, torch.Tensor]]]) -> bytes:
    """Rows of (title, (g, g) map) drawn over the image, each map scaled to its own maximum."""
    rows, cols = len(panels), max(len(r) for r in panels)
    fig = new_figure(1.6 * cols + 0.5, 1.7 * rows + 0.3)
    for r, row in enumerate(panels):
        for c, (title, m) in enumerate(row):
            ax = fig.add_subplot(rows, cols, r * cols + c + 1)
            ax.imshow(image)
            size = image.shape[0]
            ax.imshow(m.float().numpy(), cmap="inferno", alpha=0.6, extent=(0, size, size, 0), interpolation="nearest")
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    return _png(fig)


def example_files(ex: Explanation, image: Image.Image, question: str) -> dict[str, bytes | str]:
    """{file name: content} for one explained example."""
    pixels = np.asarray(image.convert("RGB"))
    files: dict[str, bytes | str] = {}
    rows = []
    for site, maps in ex.vit.items():
        for h, m in enumerate(maps):
            rows += [{"site": site, "head": h, "token": "[CLS]", "row": i, "col": j, "weight": float(m[i, j])}
                     for i in range(ex.grid) for j in range(ex.grid)]
    for site, maps in ex.question.items():
        for h in range(maps.shape[0]):
            for t, token in enumerate(ex.tokens):
                m = maps[h, t]
                rows += [{"site": site, "head": h, "token": token, "row": i, "col": j, "weight": float(m[i, j])}
                         for i in range(ex.grid) for j in range(ex.grid)]
    files["maps.csv"] = _csv(rows)
    if ex.vit:
        files["vit_heads.png"] = _grid_figure(pixels, [[(f"{s.split('/')[1]} h{h}", m) for h, m in enumerate(maps)]
                                                       for s, maps in ex.vit.items()])
    if ex.question:
        files["question_heads.png"] = _grid_figure(
            pixels, [[(f"{s.split('/')[1]} h{h}", maps[h].mean(0)) for h in range(maps.shape[0])]
                     for s, maps in ex.question.items()])
        last = list(ex.question.values())[-1]  # (h, T, g, g)
        files["question_tokens.png"] = _grid_figure(pixels, [[(tok, last[:, t].mean(0)) for t, tok in enumerate(ex.tokens)]])
    methods = []
    for method in METHODS[:-1]:
        try:
            methods.append((method, patch_relevance(ex, method)))
        except InspectError:
            pass
    files["methods.png"] = _grid_figure(pixels, [methods])
    lines = ["# Inspect: one example", "", f"Question: `{question}` (tokens: {' '.join(ex.tokens)})", "",
             f"Answer: **{ex.answer}** (p = {ex.probability:.3f})", ""]
    if not ex.question:
        lines += ["No question -> patch attention in this model (late fusion pools each modality before fusing).", ""]
    for name, title in (("vit_heads.png", "ViT: CLS -> patch attention, layer x head"),
                        ("question_heads.png", "Fusion: question -> patch attention, layer x head (mean over tokens)"),
                        ("question_tokens.png", "Last fusion layer: each question token's attention (mean over heads)"),
                        ("methods.png", "The relevance map of each method (faithfulness: task=faithfulness)")):
        if name in files:
            lines += [f"## {title}", "", f"![{title}]({name})", ""]
    lines += ["Every weight drawn is in `maps.csv`."]
    files["report.md"] = "\n".join(lines) + "\n"
    return files


def faithfulness_files(rows: list[dict], summary: list[dict], curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                       command: str) -> dict[str, bytes | str]:
    files: dict[str, bytes | str] = {"faithfulness.csv": _csv(rows), "summary.csv": _csv(summary)}
    fig = new_figure(10.0, 4.0)
    for i, (kind, column) in enumerate((("deletion", 1), ("insertion", 2))):
        ax = fig.add_subplot(1, 2, i + 1)
        for method, c in curves.items():
            ax.plot(c[0], c[column], label=method, linestyle="--" if method == "random" else "-")
        ax.set_xlabel(f"fraction of patches {'deleted' if kind == 'deletion' else 'inserted'}, most relevant first")
        ax.set_ylabel("p(model's answer)")
        ax.set_title(f"{kind} (mean over examples)")
        ax.legend(fontsize="small")
    files["curves.png"] = _png(fig)
    n = summary[0]["n"] if summary else 0
    lines = ["# Inspect: faithfulness of attention maps", "", f"`{command}`", "",
             f"{n} questions. Patches deleted (set to the mean colour) or inserted in each map's order; the area "
             "under p(model's answer) against the fraction of patches. Lower deletion AUC and higher insertion "
             "AUC mean a more faithful map; `random` is the baseline (± one standard error over questions).", "",
             "| method | deletion AUC | vs random | insertion AUC | vs random |", "|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['method']} | {s['deletion_auc']:.3f} ± {s['deletion_se']:.3f} | "
                     f"{s.get('deletion_vs_random', float('nan')):+.3f} | {s['insertion_auc']:.3f} ± "
                     f"{s['insertion_se']:.3f} | {s.get('insertion_vs_random', float('nan')):+.3f} |")
    lines += ["", "![curves](curves.png)", ""]
    files["report.md"] = "\n".join(lines)
    return files


def write(folder: Path, files: dict[str, bytes | str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        write_atomic(folder / name, content)
    return [folder / name for name in files]
