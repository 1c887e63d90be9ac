"""Recipes from dish photos, the Inverse Cooking way: the ingredient head predicts the ingredient set
from the image, then the GPT-2 decoder writes the recipe reading the image tokens (cross-attention)
and the predicted set, given as a text prefix ("using: basil, tomato").

Why a text prefix and not extra cross-attention memory: the decoder has to *write* the ingredient
names, and copying words it reads in its own context is what causal self-attention does best; the
prefix reuses the token embeddings the decoder learns anyway (no new embedding table for
ingredients), training feeds the true set there (teacher forcing) and generation the predicted one,
and the prompt is plain text a person can read and edit. The LightningModule (validation),
`Bundle.recipe` and the demo all call these functions.

A small decoder does not learn to copy the prompt reliably, so by default generation is also
constrained (`recipe.ban_absent_ingredients`): every spelling of a vocabulary ingredient that is not
in the row's set is banned from its text (`BanAbsentIngredients`, a transformers `LogitsProcessor`),
so a recipe can only name ingredients of its set; which ones of those it names is still the model's
choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor, LogitsProcessorList

from mmqa.data.batch import prompt_ids
from mmqa.data.recipe_text import recipe_prompt
from mmqa.models.mmqa_model import MMQAModel
from mmqa.models.outputs import EncoderOutput


@dataclass
class RecipeSettings:
    """The `recipe` section of conf/train.yaml, with the defaults a config written before a key
    existed gets; the LightningModule and `Bundle.recipe` both read it through `of`."""

    ingredient_threshold: float = 0.5  # the set scored by ingredient P/R/F1/IoU
    prompt_threshold: float | None = None  # the set a recipe is written with; None: ingredient_threshold
    ban_absent_ingredients: bool = True
    generation: dict = field(default_factory=dict)  # transformers `generate` kwargs

    @classmethod
    def of(cls, section) -> RecipeSettings:
        s = dict(section or {})
        threshold = float(s.get("ingredient_threshold", cls.ingredient_threshold))
        prompt = s.get("prompt_threshold")
        return cls(
            ingredient_threshold=threshold,
            prompt_threshold=threshold if prompt is None else float(prompt),
            ban_absent_ingredients=bool(s.get("ban_absent_ingredients", True)),
            generation=dict(s.get("generation") or {}),
        )

    def banned_from(self, vocabulary: list[str]) -> list[str] | None:
        """`write_recipes`' vocabulary: the ingredients a recipe may not name outside its set, or None."""
        return vocabulary if self.ban_absent_ingredients else None


@torch.no_grad()
def predict_ingredients(
    model: MMQAModel, img: EncoderOutput, vocabulary: list[str], threshold: float
) -> tuple[torch.Tensor, list[list[str]]]:
    """Sigmoid probabilities (B, I) and, per image, the names whose probability reaches `threshold`."""
    probs = model.ingredient_logits(img).sigmoid()  # (B, I)
    sets = [[vocabulary[j] for j in row.nonzero().flatten().tolist()] for row in probs >= threshold]
    return probs, sets


def spellings(name: str) -> list[str]:
    """The forms a recipe may write an ingredient in: the name and its English plural."""
    if name.endswith("y") and name[-2:-1] not in "aeiou":
        plural = name[:-1] + "ies"
    elif name.endswith(("o", "s", "x", "z", "ch", "sh")):
        plural = name + "es"
    else:
        plural = name + "s"
    return [name, plural]


class BanAbsentIngredients(LogitsProcessor):
    """Per batch row, forbids every token sequence that spells a vocabulary ingredient absent from that
    row's set (the sequence's last token is banned once the ones before it were written). A token that
    also spells a part of a present ingredient ("cream" when "sour cream" is there) stays allowed."""

    def __init__(self, tokenizer, vocabulary: list[str], sets: list[list[str]], num_beams: int = 1):
        def pieces(name: str) -> set[tuple[int, ...]]:
            return {tuple(tokenizer(f, add_special_tokens=False)["input_ids"]) for s in spellings(name) for f in (s, " " + s)}

        forms = {n: pieces(n) for n in vocabulary}
        self.single = torch.zeros(len(sets), len(tokenizer), dtype=torch.bool)  # (S, V) banned outright
        self.multi = []  # per set: the longer sequences, whose last token is banned after the others
        for i, chosen in enumerate(sets):
            allowed = {t for n in chosen for seq in forms.get(n, ()) for t in seq}
            seqs = {seq for n in vocabulary if n not in chosen for seq in forms[n] if seq}
            self.single[i, [s[0] for s in seqs if len(s) == 1 and s[0] not in allowed]] = True
            self.multi.append([s for s in seqs if len(s) > 1])
        self.num_beams = num_beams

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:  # (R, V)
        rows = torch.arange(scores.shape[0]) // self.num_beams  # (R,) the set of each row
        banned = self.single[rows, : scores.shape[1]]  # (R, V'): a model vocabulary may be wider than the tokenizer's
        banned = F.pad(banned, (0, scores.shape[1] - banned.shape[1]))
        scores = scores.masked_fill(banned.to(scores.device), float("-inf"))
        for r in range(scores.shape[0]):
            for seq in self.multi[rows[r]]:
                n = len(seq) - 1
                if input_ids.shape[1] >= n and input_ids[r, -n:].tolist() == list(seq[:-1]):
                    scores[r, seq[-1]] = float("-inf")
        return scores


@torch.no_grad()
def write_recipes(
    model: MMQAModel,
    tokenizer,
    img: EncoderOutput,
    ingredient_sets: list[list[str]],
    vocabulary: list[str] | None = None,
    **generate_kwargs,
) -> list[str]:
    """One recipe text per image (tokens (B, N, D)), conditioned on its ingredient set; with
    `vocabulary`, no other ingredient of it can be written (`BanAbsentIngredients`). Prompts of
    different lengths are padded on the left, so every row continues right after its own prompt;
    `generate` derives the position ids from the attention mask."""
    pieces = tokenizer([recipe_prompt(s) for s in ingredient_sets], add_special_tokens=False)["input_ids"]
    prompts = [prompt_ids(tokenizer, p) for p in pieces]
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.tensor(p)
        mask[i, P - len(p) :] = 1
    if vocabulary:
        ban = BanAbsentIngredients(tokenizer, vocabulary, ingredient_sets, generate_kwargs.get("num_beams", 1))
        generate_kwargs["logits_processor"] = LogitsProcessorList([ban, *generate_kwargs.get("logits_processor", [])])
    device = img.tokens.device
    out = model.generate(img, ids.to(device), attention_mask=mask.to(device), **generate_kwargs)  # (B, P + new)
    return tokenizer.batch_decode(out[:, P:], skip_special_tokens=True)
