"""What `python -m mmqa inspect` writes into its folder: `report.md`, PNGs and a CSV of every number shown.

- task=example: `vit_heads.png` (CLS -> patch attention, ViT layer x head), `question_heads.png`
  (question -> patch attention, fusion layer x head, mean over the question's tokens), `question_tokens.png`
  (the last fusion layer, one panel a token, mean over heads), `methods.png` (the relevance map of each
  faithfulness method), `caption_words.png` (the greedy caption, each word with the decoder's
  cross-attention while writing it), `maps.csv` (site, head, token, row, col, weight);
- task=faithfulness: `faithfulness.csv` (one row per example and method), `summary.csv`, `curves.png`
  (mean deletion and insertion curves per method);
- task=heads: `importance.csv`, `masking.csv`, `masking.png`;
- task=lens: `lens.csv`, `lens.png` (the VQA head per fusion layer), `decoder_lens.csv`, `decoder_lens.png`
  (the LM head per decoder layer);
- task=compare: `heads.csv` (JS divergence and entropies), `cka.csv`, `words.csv`, `js.png`;
- task=patching: `patching.csv` (one row per site), `patching.png`.
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

VQA_POINT = 0.01  # "one point" of VQA accuracy, and of BLEU-4
CAPTION_POINT = 0.01  # and of the caption loss, in nats per token (about 1% perplexity)


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


def example_files(ex: Explanation, image: Image.Image, question: str,
                  words: list[tuple[str, torch.Tensor]] = ()) -> dict[str, bytes | str]:
    """{file name: content} for one explained example; `words`: the caption's words with the decoder's
    cross-attention map of each (`maps.caption_maps`)."""
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
    for i, (word, m) in enumerate(words):
        rows += [{"site": "decoder/cross (caption)", "head": "mean", "token": f"{i}:{word}", "row": r, "col": c,
                  "weight": float(m[r, c])} for r in range(ex.grid) for c in range(ex.grid)]
    if words:
        per_row = 8
        files["caption_words.png"] = _grid_figure(pixels, [list(words[i:i + per_row]) for i in range(0, len(words), per_row)])
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
    if words:
        lines += [f"Caption: {' '.join(w for w, _ in words)}", ""]
    if not ex.question:
        lines += ["No question -> patch attention in this model (late fusion pools each modality before fusing).", ""]
    for name, title in (("vit_heads.png", "ViT: CLS -> patch attention, layer x head"),
                        ("question_heads.png", "Fusion: question -> patch attention, layer x head (mean over tokens)"),
                        ("question_tokens.png", "Last fusion layer: each question token's attention (mean over heads)"),
                        ("methods.png", "The relevance map of each method (faithfulness: task=faithfulness)"),
                        ("caption_words.png", "The caption, word by word: the decoder's cross-attention (mean over heads and layers)")):
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


def heads_files(scores: dict[str, torch.Tensor], curve: list[dict], command: str) -> dict[str, bytes | str]:
    """Head importance per site and the masking curve of each stack, with the heads that go at <= 1 point."""
    rows = [{"site": site, "head": h, "importance": float(v)} for site, vec in scores.items() for h, v in enumerate(vec)]
    files: dict[str, bytes | str] = {"importance.csv": _csv(rows), "masking.csv": _csv(curve)}
    stacks = list(dict.fromkeys(r["stack"] for r in curve))
    fig = new_figure(5.0 * len(stacks), 3.8)
    for i, stack in enumerate(stacks):
        ax = fig.add_subplot(1, len(stacks), i + 1)
        pts = [r for r in curve if r["stack"] == stack]
        ax.plot([r["fraction"] for r in pts], [r["vqa_acc"] for r in pts], marker="o", label="VQA accuracy")
        ax.plot([r["fraction"] for r in pts], [r["bleu4"] for r in pts], marker="^", color="C2", label="BLEU-4")
        ax.legend(loc="lower left", fontsize=8)
        ax.set_xlabel("share of heads masked, least important first")
        ax.set_title(stack)
        ax.set_ylim(0, 1)
        if stack == "decoder" or any(r["caption_loss"] for r in pts):
            twin = ax.twinx()
            twin.plot([r["fraction"] for r in pts], [r["caption_loss"] for r in pts], color="C1", marker="s")
            twin.set_ylabel("caption loss (orange)")
        ax.set_ylabel("VQA accuracy, BLEU-4")
    files["masking.png"] = _png(fig)
    lines = ["# Inspect: which heads matter", "", f"`{command}`", "",
             "Importance = E|dL/dξ| of a mask ξ on each head's output (Michel et al. 2019), L = VQA + caption "
             "loss, normalised per site. Each stack's heads are then masked least important first. A point on "
             f"the curve costs <= 1 point when VQA accuracy and BLEU-4 of greedy captions each drop by at most "
             f"{VQA_POINT} and (for every stack, since the image tower also serves the decoder) the caption "
             f"loss rises by at most {CAPTION_POINT} nats per token.", "",
             "| stack | heads | VQA, none masked | most masked at <= 1 point | VQA there | BLEU-4: none -> there "
             "| caption loss: none -> there |",
             "|---|---|---|---|---|---|---|"]
    best = {}
    for stack in stacks:
        pts = [r for r in curve if r["stack"] == stack]
        base = pts[0]
        ok = [r for r in pts if r["vqa_acc"] >= base["vqa_acc"] - VQA_POINT
              and not r["bleu4"] < base["bleu4"] - VQA_POINT  # nan (no captions): not a criterion
              and r["caption_loss"] <= base["caption_loss"] + CAPTION_POINT]
        best[stack] = max(ok, key=lambda r: r["heads_masked"])
        b = best[stack]
        lines.append(f"| {stack} | {base['heads']} | {base['vqa_acc']:.3f} | {b['heads_masked']} ({b['fraction']:.0%}) "
                     f"| {b['vqa_acc']:.3f} | {base['bleu4']:.3f} -> {b['bleu4']:.3f} "
                     f"| {base['caption_loss']:.3f} -> {b['caption_loss']:.3f} |")
    lines += ["", "The heads that go at <= 1 point (per stack, the largest such set on the curve):", ""]
    lines += [f"- {stack}: {b['masked'] or 'none'}" for stack, b in best.items()]
    lines += ["", "![masking](masking.png)", "", "Every importance is in `importance.csv`, every point in `masking.csv`."]
    files["report.md"] = "\n".join(lines) + "\n"
    return files


def lens_files(rows: list[dict], decoder_rows: list[dict], command: str) -> dict[str, bytes | str]:
    """VQA accuracy when the head reads each fusion layer, overall and per family; next-token accuracy
    and loss when the LM head reads each decoder layer (`decoder_rows`, empty without captions)."""
    keys = [k for k in rows[0] if k.startswith("vqa_acc")]
    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    for k in keys:
        ax.plot([r["layer"] for r in rows], [r[k] for r in rows], marker="o", label=k.removeprefix("vqa_acc/") or "overall",
                linewidth=2.5 if k == "vqa_acc" else 1.2)
    ax.set_xlabel("fusion layer read by the VQA head")
    ax.set_ylabel("VQA accuracy")
    ax.set_xticks([r["layer"] for r in rows])
    ax.legend(fontsize="small")
    names = ["overall" if k == "vqa_acc" else k.removeprefix("vqa_acc/") for k in keys]
    lines = ["# Inspect: logit lens", "", f"`{command}`", "",
             "The VQA head reads the fusion's output after each layer (its final norm and pooling applied).", "",
             "| layer | " + " | ".join(names) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += ["| " + " | ".join([str(r["layer"])] + [f"{r[k]:.3f}" for k in keys]) + " |" for r in rows]
    lines += ["", "![lens](lens.png)", "", "## The decoder", ""]
    files: dict[str, bytes | str] = {"lens.csv": _csv(rows), "lens.png": _png(fig)}
    if decoder_rows:
        files["decoder_lens.csv"], files["decoder_lens.png"] = _csv(decoder_rows), _decoder_lens_figure(decoder_rows)
        lines += [f"GPT-2's final layer norm and LM head read the hidden state after each decoder layer, on the "
                  f"teacher-forced captions of these batches ({decoder_rows[0]['tokens']} labelled tokens): "
                  "next-token accuracy and cross-entropy (nats per token). The last layer's row is the model's own.",
                  "", "| layer | next-token accuracy | loss |", "|---|---|---|"]
        lines += [f"| {r['layer']} | {r['accuracy']:.3f} | {r['loss']:.3f} |" for r in decoder_rows]
        lines += ["", "![decoder lens](decoder_lens.png)"]
    else:
        lines += ["No captions in these batches: nothing for the decoder to read."]
    files["report.md"] = "\n".join(lines) + "\n"
    return files


def _decoder_lens_figure(rows: list[dict]) -> bytes:
    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    layers = [r["layer"] for r in rows]
    ax.plot(layers, [r["accuracy"] for r in rows], marker="o", label="next-token accuracy")
    ax.set_xlabel("decoder layer read by the LM head")
    ax.set_ylabel("next-token accuracy")
    ax.set_xticks(layers)
    twin = ax.twinx()
    twin.plot(layers, [r["loss"] for r in rows], color="C1", marker="s")
    twin.set_ylabel("loss, nats per token (orange)")
    return _png(fig)


def compare_files(result: dict, command: str, top: int = 10) -> dict[str, bytes | str]:
    """Two checkpoints side by side: JS divergence and entropy per site and head, CKA per block, words."""
    heads, cka, words = result["heads"], result["cka"], result["words"]
    sites = list(dict.fromkeys(r["site"] for r in heads))
    width = max(r["head"] for r in heads) + 1
    grid = np.full((len(sites), width), np.nan)
    for r in heads:
        grid[sites.index(r["site"]), r["head"]] = r["js"]
    fig = new_figure(2.0 + 0.6 * width, 1.0 + 0.3 * len(sites))
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
    ax.set_yticks(range(len(sites)), sites, fontsize=7)
    ax.set_xticks(range(width))
    ax.set_xlabel("head")
    ax.set_title("Jensen-Shannon divergence of attention, A vs B")
    fig.colorbar(image, ax=ax)
    lines = ["# Inspect: two checkpoints compared", "", f"`{command}`", "",
             "| site | mean JS divergence (bits) | entropy A | entropy B | change |", "|---|---|---|---|---|"]
    for site in sites:
        rs = [r for r in heads if r["site"] == site]
        mean = {k: float(np.mean([r[k] for r in rs])) for k in ("js", "entropy_a", "entropy_b")}
        lines.append(f"| {site} | {mean['js']:.4f} | {mean['entropy_a']:.3f} | {mean['entropy_b']:.3f} | "
                     f"{mean['entropy_b'] - mean['entropy_a']:+.3f} |")
    lines += ["", "| block | linear CKA |", "|---|---|"] + [f"| {r['block']} | {r['cka']:.4f} |" for r in cka]
    frequent = [w for w in words if w["count"] >= 5]
    lines += ["", "Words that gained the most attention in the text encoder (seen >= 5 times; attention each "
              "receives, mean over layers, heads and queries):", "", "| word | seen | A | B | gain |", "|---|---|---|---|---|"]
    lines += [f"| {w['word']} | {w['count']} | {w['attention_a']:.4f} | {w['attention_b']:.4f} | {w['gain']:+.4f} |"
              for w in frequent[:top] + frequent[-top:][::-1]]
    lines += ["", "![js](js.png)", "", "Every number is in `heads.csv`, `cka.csv` and `words.csv`."]
    return {"heads.csv": _csv(heads), "cka.csv": _csv(cka), "words.csv": _csv(words), "js.png": _png(fig),
            "report.md": "\n".join(lines) + "\n"}


def patching_files(rows: list[dict], counts: dict[str, int], command: str) -> dict[str, bytes | str]:
    """The share of the clean answer each patched site restores (`patching.evaluate`), as bars."""
    fig = new_figure(max(6.0, 1.5 + 0.5 * len(rows)), 4.5)
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["restored"] for r in rows], 0.4, yerr=[r["restored_se"] for r in rows], label="answer restored (mean share)")
    ax.bar(x + 0.2, [r["answer_restored"] for r in rows], 0.4, label="pairs answered as clean")
    ax.set_xticks(x, [r["site"] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.legend(fontsize="small")
    ax.set_title("one site patched from the clean run")
    lines = ["# Inspect: activation patching", "", f"`{command}`", "",
             "Pairs of scenes that differ in one object's colour, asked \"what colour is the ...?\" about it. Each "
             "site's activation is copied from the clean run into the corrupted run, one site at a time; "
             "\"(object patches)\": only the tokens of the patches the recolouring touched. Restored: "
             "(p(patched) - p(corrupted)) / (p(clean) - p(corrupted)), p the sigmoid probability of the clean "
             "answer (mean ± one standard error over pairs); answered as clean: the share of pairs whose patched "
             "answer is the clean one.", "",
             f"{counts['tried']} pairs tried, {counts['used']} used: {counts['clean_wrong']} skipped as the clean "
             f"answer was wrong, {counts['corrupted_unchanged']} as the corrupted answer was the clean one.", "",
             "| site | restored | answered as clean |", "|---|---|---|"]
    lines += [f"| {r['site']} | {r['restored']:.3f} ± {r['restored_se']:.3f} | {r['answer_restored']:.3f} |" for r in rows]
    lines += ["", "![patching](patching.png)", "", "Every number is in `patching.csv`."]
    return {"patching.csv": _csv(rows), "patching.png": _png(fig), "report.md": "\n".join(lines) + "\n"}


def write(folder: Path, files: dict[str, bytes | str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        write_atomic(folder / name, content)
    return [folder / name for name in files]
