"""How well each fusion variant reasons about where things are when perception is perfect.

    python benchmarks/relational_oracle.py [--fusions cross relation] [--epochs 8] [--threads 2]
                                           [--set anchored_heads=2]   (keys of the fusion YAMLs)

The full model must first learn to see shapes, colours and sizes before any relational question can
be answered, so a short proxy run measures perception as much as reasoning (docs/relational.md).
This script takes perception away: each image of the relational shapes world (`data=shapes_relational`,
generated on first use) becomes its 8 x 8 patch grid of *true* object tokens (a learned embedding of
the shape, colour and size of whatever object covers each patch, background elsewhere) with the
model's fixed 2D sin-cos grid positions added, exactly as `MMQAModel.encode_images` adds them. A
one-layer transformer reads the question's words, the fusion variant under test (its YAML in
conf/model/fusion/, at the default width) fuses the two, and a linear head answers. Prints validation
and test accuracy per question family for each variant; seconds per epoch say the cost.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from torch import nn

import mmqa.config_check  # noqa: F401 - registers the config schema conf/train.yaml names
from mmqa.data.worlds.shapes import COLOURS, SHAPES, SIZES

ROOT = Path(__file__).resolve().parents[1]
D, GRID = 64, 8  # the default model width; 64 px images in 8 px patches


def dataset_dir() -> Path:
    """The relational world of `data=shapes_relational`, generated (or reused) through its own reader."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["data=shapes_relational", f"paths.root_dir={ROOT}",
                                          f"paths.data_dir={ROOT}/data", "paths.output_dir=/tmp/mmqa-oracle"])
    return instantiate(cfg.data.reader).dataset_dir


def object_grid(objects: list[dict], image_size: int) -> torch.Tensor:
    """(GRID*GRID, 3) ids of (shape, colour, size) covering each patch; 0 is nothing (background)."""
    ids = torch.zeros(GRID * GRID, 3, dtype=torch.long)
    cell = image_size / GRID
    for o in objects:
        x0, x1 = o["x"] - o["extent"] / 2, o["x"] + o["extent"] / 2
        y0, y1 = o["y"] - o["extent"] / 2, o["y"] + o["extent"] / 2
        for r in range(int(y0 // cell), min(GRID, math.ceil(y1 / cell))):
            for c in range(int(x0 // cell), min(GRID, math.ceil(x1 / cell))):
                ids[r * GRID + c] = torch.tensor([1 + SHAPES.index(o["shape"]), 1 + list(COLOURS).index(o["colour"]),
                                                  1 + list(SIZES).index(o["size"])])
    return ids


def load(root: Path) -> tuple[dict, dict, list[str]]:
    """Per split: (object grids (I, 64, 3), question word lists, answers, families, image index)."""
    size = json.loads((root / "meta.json").read_text())["params"]["image_size"]
    scenes = [json.loads(line) for line in (root / "scenes.jsonl").read_text().splitlines()]
    grids = {scene["image"]: object_grid(scene["objects"], size) for scene in scenes}
    splits = {}
    for split in ("train", "val", "test"):
        rows = [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "question" in r]
        images = sorted({r["image"] for r in rows})
        index = {im: i for i, im in enumerate(images)}
        splits[split] = dict(grids=torch.stack([grids[im] for im in images]),
                             words=[r["question"].rstrip("?").split() for r in rows],
                             answers=[r["answers"][0] for r in rows], families=[r["question_type"] for r in rows],
                             image=torch.tensor([index[r["image"]] for r in rows]))
    vocab = sorted({w for ws in splits["train"]["words"] for w in ws})  # a word training never saw reads as 0
    return splits, {w: i + 1 for i, w in enumerate(vocab)}, sorted(set(splits["train"]["answers"]))


class OracleModel(nn.Module):
    def __init__(self, fusion: nn.Module, vocab_size: int, n_answers: int):
        super().__init__()
        self.shape, self.colour, self.size = (nn.Embedding(n + 1, D) for n in (len(SHAPES), len(COLOURS), len(SIZES)))
        self.register_buffer("position", build_sincos2d_pos_embed([GRID, GRID], D), persistent=False)  # (N, D)
        self.words = nn.Embedding(vocab_size + 1, D, padding_idx=0)
        self.word_position = nn.Parameter(torch.zeros(32, D))
        self.text = nn.TransformerEncoderLayer(D, 4, 4 * D, dropout=0.0, batch_first=True, norm_first=True)
        self.fusion = fusion
        self.head = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, n_answers))

    def forward(self, grids: torch.Tensor, ids: torch.Tensor, img_idx: torch.Tensor) -> torch.Tensor:
        img = self.shape(grids[..., 0]) + self.colour(grids[..., 1]) + self.size(grids[..., 2]) + self.position  # (B, N, D)
        mask = ids > 0  # (Q, T)
        txt = self.text(self.words(ids) + self.word_position[: ids.shape[1]], src_key_padding_mask=~mask)  # (Q, T, D)
        fused = self.fusion(img, torch.ones(img.shape[:2], dtype=torch.bool), txt, mask, img_idx)
        return self.head(fused.pooled)  # (Q, A)


def batches(split: dict, vocab: dict, answers: dict, images_per_batch: int, shuffle: bool, g: torch.Generator):
    n_images = split["grids"].shape[0]
    order = torch.randperm(n_images, generator=g) if shuffle else torch.arange(n_images)
    by_image = defaultdict(list)
    for q, i in enumerate(split["image"].tolist()):
        by_image[i].append(q)
    for start in range(0, n_images, images_per_batch):
        imgs = order[start:start + images_per_batch].tolist()
        qs = [q for row, i in enumerate(imgs) for q in by_image[i]]
        rows = torch.tensor([row for row, i in enumerate(imgs) for _ in by_image[i]])
        t = max(len(split["words"][q]) for q in qs)
        ids = torch.tensor([[vocab.get(w, 0) for w in split["words"][q]] + [0] * (t - len(split["words"][q])) for q in qs])
        target = torch.tensor([answers.get(split["answers"][q], -100) for q in qs])
        yield split["grids"][imgs], ids, rows, target, qs


def evaluate(model: OracleModel, split: dict, vocab: dict, answers: dict) -> dict[str, float]:
    right, total = defaultdict(int), defaultdict(int)
    model.eval()
    with torch.no_grad():
        for grids, ids, rows, target, qs in batches(split, vocab, answers, 100, False, torch.Generator()):
            hit = (model(grids, ids, rows).argmax(-1) == target).tolist()
            for q, h in zip(qs, hit):
                for key in ("all", split["families"][q]):
                    right[key] += h
                    total[key] += 1
    model.train()
    return {k: right[k] / total[k] for k in total}


def run(name: str, splits: dict, vocab: dict, answer_list: list[str], epochs: int, lr: float,
        overrides: list[str]) -> dict:
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "fusion" / f"{name}.yaml")
    cfg.dim, cfg.dropout, cfg.attention, cfg.qk_norm = D, 0.0, None, False
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    torch.manual_seed(0)
    answers = {a: i for i, a in enumerate(answer_list)}
    model = OracleModel(instantiate(cfg), len(vocab), len(answers))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(splits["train"]["grids"].shape[0] / 32)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    g, start = torch.Generator().manual_seed(0), time.perf_counter()
    for epoch in range(epochs):
        for grids, ids, rows, target, _ in batches(splits["train"], vocab, answers, 32, True, g):
            loss = nn.functional.cross_entropy(model(grids, ids, rows), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        val = evaluate(model, splits["val"], vocab, answers)
        print(f"{name} epoch {epoch + 1}: val {val['all']:.3f}", flush=True)
    return dict(val=val, test=evaluate(model, splits["test"], vocab, answers),
                epoch_s=(time.perf_counter() - start) / epochs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fusions", nargs="+", default=["cross", "relation"])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="fusion config keys to change")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    splits, vocab, answers = load(dataset_dir())
    results = {name: run(name, splits, vocab, answers, args.epochs, args.lr, args.set) for name in args.fusions}
    families = sorted(k for k in next(iter(results.values()))["test"] if k != "all")
    print(f"\n| fusion | split | all | {' | '.join(families)} | s / epoch |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in families) + " | --- |")
    for name, r in results.items():
        for split in ("val", "test"):
            cells = " | ".join(f"{r[split][f]:.3f}" for f in families)
            print(f"| {name} | {split} | {r[split]['all']:.3f} | {cells} | {r['epoch_s']:.0f} |")


if __name__ == "__main__":
    main()
