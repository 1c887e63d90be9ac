"""From image records to one multi-task batch. Each image appears once in a batch with all of its
questions, captions (and their concept words), ingredients and recipe; questions, captions and recipes carry the row of their
image (`q_img_idx`, `c_img_idx`, `r_img_idx`) so the model encodes each image once."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from mmqa.data.augment import QuestionNoise
from mmqa.data.concepts import caption_words
from mmqa.data.images import ImageTransform, load_image
from mmqa.data.recipe_text import format_recipe, recipe_prompt
from mmqa.data.records import ImageRecord
from mmqa.metrics.vqa import soft_scores


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, S, S)
    image_ids: torch.Tensor  # (B,) index of each image in its split
    q_input_ids: torch.Tensor  # (Q, Lq) questions, text-encoder tokens
    q_attention_mask: torch.Tensor  # (Q, Lq)
    q_img_idx: torch.Tensor  # (Q,) row in `images` of each question's image
    vqa_targets: torch.Tensor  # (Q, K) soft scores over the answer vocabulary
    c_input_ids: torch.Tensor  # (C, Lc) captions, text-encoder tokens (contrastive)
    c_attention_mask: torch.Tensor  # (C, Lc)
    c_img_idx: torch.Tensor  # (C,) row in `images` of each caption's image
    c_dec_input_ids: torch.Tensor  # (C, Ld) [BOS] caption [EOS], decoder tokens
    c_dec_attention_mask: torch.Tensor  # (C, Ld)
    c_dec_labels: torch.Tensor  # (C, Ld) c_dec_input_ids with padding positions set to -100
    clip_caption: torch.Tensor  # (B,) caption row paired with each image for the contrastive loss, -1 if none
    ingredient_targets: torch.Tensor  # (B, I) multi-hot over the ingredient vocabulary
    has_ingredients: torch.Tensor  # (B,) bool: the image has an ingredient list
    concept_targets: torch.Tensor  # (B, V) multi-hot: the concept words its captions use (mmqa.data.concepts)
    has_concepts: torch.Tensor  # (B,) bool: the image has captions
    r_input_ids: torch.Tensor  # (R, Lr) [BOS] prompt [SEP] recipe [EOS], decoder tokens
    r_attention_mask: torch.Tensor  # (R, Lr)
    r_labels: torch.Tensor  # (R, Lr) -100 on the prompt and the padding: only the recipe is learnt
    r_img_idx: torch.Tensor  # (R,) row in `images` of each recipe's image
    q_answers: list[list[str]]  # annotators' answers per question, for VQA accuracy
    q_families: list[str | None]  # family per question, for per-family accuracy
    refs: list[list[str]]  # all captions per image, for BLEU / CIDEr
    recipes: list[dict | None]  # the recipe of each image, for recipe BLEU and hallucination
    ingredients: list[list[str]]  # the ingredient names of each image

    @property
    def num_recipes(self) -> int:
        return self.r_img_idx.numel()

    @property
    def num_questions(self) -> int:
        return self.q_img_idx.numel()

    @property
    def num_captions(self) -> int:
        return self.c_img_idx.numel()


def multi_hot(label_sets: list, index: dict[str, int]) -> torch.Tensor:
    """(rows, len(index)) with 1 where a row's label is in the vocabulary `index`; other labels are ignored."""
    out = torch.zeros(len(label_sets), len(index))
    for row, labels in enumerate(label_sets):
        for label in labels:
            if label in index:
                out[row, index[label]] = 1.0
    return out


def prompt_ids(tokenizer, prompt: list[int]) -> list[int]:
    """[BOS] prompt [SEP]: what the decoder reads before a recipe (eos separates where there is no sep)."""
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    return [tokenizer.bos_token_id] + prompt + [sep]


class RecordDataset(Dataset):
    """Image records -> (index, image tensor, record). Images are decoded lazily, one per item."""

    def __init__(self, records: list[ImageRecord], transform: ImageTransform):
        self.records = records
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, ImageRecord]:
        rec = self.records[i]
        return i, self.transform(load_image(rec.image)), rec


class Collator:
    """Tokenises and stacks a list of dataset items into one `Batch`."""

    def __init__(
        self,
        text_tokenizer,
        decoder_tokenizer,
        answers: list[str],
        max_question_length: int,
        max_caption_length: int,
        max_captions_per_image: int,
        train: bool,
        ingredients: list[str] = (),
        max_recipe_length: int = 256,
        concepts: list[str] = (),
        question_noise: QuestionNoise | None = None,
        seed: int = 0,
    ):
        """`seed`: with the batch's item indices, it seeds the batch's random picks (which captions,
        which noise), so a batch is the same whether it is made in the main process or a loader
        worker, and again after a resume."""
        self.seed = seed
        self.text_tok = text_tokenizer
        self.dec_tok = decoder_tokenizer
        self.answer_index = {a: i for i, a in enumerate(answers)}
        self.max_q = max_question_length
        self.max_c = max_caption_length
        self.max_captions = max_captions_per_image
        self.train = train
        self.ingredient_index = {n: i for i, n in enumerate(ingredients)}
        self.concept_index = {w: i for i, w in enumerate(concepts)}
        self.max_r = max_recipe_length
        self.question_noise = question_noise  # training batches only: made-up words (mmqa.data.augment)

    def encode_text(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not texts:
            empty = torch.zeros(0, 1, dtype=torch.long)
            return empty, empty
        enc = self.text_tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def _pad(self, seqs: list[list[int]], keep_from: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ids, mask and labels; labels are -100 on padding (by position, never by token id:
        pad may equal eos) and before `keep_from[i]` (a prompt the decoder reads but is not taught)."""
        L = max((len(s) for s in seqs), default=1)
        ids = torch.full((len(seqs), L), self.dec_tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        labels = torch.full((len(seqs), L), -100, dtype=torch.long)
        for i, (s, k) in enumerate(zip(seqs, keep_from)):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            labels[i, k : len(s)] = ids[i, k : len(s)]
        return ids, mask, labels

    def _pieces(self, texts: list[str]) -> list[list[int]]:
        return self.dec_tok(texts, add_special_tokens=False)["input_ids"] if texts else []

    def _encode_decoder(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tok = self.dec_tok
        seqs = [[tok.bos_token_id] + p[: self.max_c - 2] + [tok.eos_token_id] for p in self._pieces(texts)]
        return self._pad(seqs, [0] * len(seqs))

    def _encode_recipes(self, prompts: list[str], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        heads = [prompt_ids(self.dec_tok, p) for p in self._pieces(prompts)]
        seqs = [h + (t + [self.dec_tok.eos_token_id])[: max(1, self.max_r - len(h))] for h, t in zip(heads, self._pieces(texts))]
        return self._pad(seqs, [len(h) for h in heads])

    def __call__(self, items: list[tuple[int, torch.Tensor, ImageRecord]]) -> Batch:
        rng = random.Random(f"mmqa-batch:{self.seed}:{[i for i, _, _ in items]}")  # a function of the batch alone
        questions, q_img, answers, families, targets = [], [], [], [], []
        captions, c_img, clip_caption, refs = [], [], [], []
        prompts, recipe_texts, r_img = [], [], []
        ing_targets = multi_hot([rec.ingredients for _, _, rec in items], self.ingredient_index)
        # from all of each image's captions, not this step's pick
        concept_targets = multi_hot([caption_words(rec.captions) if self.concept_index else () for _, _, rec in items],
                                    self.concept_index)
        for row, (_, _, rec) in enumerate(items):
            if rec.recipe is not None:
                prompts.append(recipe_prompt(rec.ingredients))
                recipe_texts.append(format_recipe(rec.recipe))
                r_img.append(row)
            for qa in rec.questions:
                questions.append(self.question_noise(qa.question, rng) if self.question_noise else qa.question)
                q_img.append(row)
                answers.append(qa.answers)
                families.append(qa.family)
                target = torch.zeros(len(self.answer_index))
                for ans, score in soft_scores(qa.answers).items():
                    if ans in self.answer_index:
                        target[self.answer_index[ans]] = score
                targets.append(target)
            n = min(len(rec.captions), self.max_captions)
            # training sees a fresh random subset of the captions each time; evaluation the first ones
            caps = rng.sample(rec.captions, n) if self.train else rec.captions[:n]
            refs.append(list(rec.captions))
            clip_caption.append(len(captions) if caps else -1)  # contrastive pair: the first of `caps`
            captions.extend(caps)
            c_img.extend([row] * len(caps))
        q_ids, q_mask = self.encode_text(questions, self.max_q)
        c_ids, c_mask = self.encode_text(captions, self.max_c)
        c_dec_ids, c_dec_mask, c_dec_labels = self._encode_decoder(captions)
        r_ids, r_mask, r_labels = self._encode_recipes(prompts, recipe_texts)
        K = len(self.answer_index)
        return Batch(
            images=torch.stack([x for _, x, _ in items]),
            image_ids=torch.tensor([i for i, _, _ in items], dtype=torch.long),
            q_input_ids=q_ids,
            q_attention_mask=q_mask,
            q_img_idx=torch.tensor(q_img, dtype=torch.long),
            vqa_targets=torch.stack(targets) if targets else torch.zeros(0, K),
            c_input_ids=c_ids,
            c_attention_mask=c_mask,
            c_img_idx=torch.tensor(c_img, dtype=torch.long),
            c_dec_input_ids=c_dec_ids,
            c_dec_attention_mask=c_dec_mask,
            c_dec_labels=c_dec_labels,
            clip_caption=torch.tensor(clip_caption, dtype=torch.long),
            ingredient_targets=ing_targets,
            has_ingredients=torch.tensor([bool(rec.ingredients) for _, _, rec in items], dtype=torch.bool),
            concept_targets=concept_targets,
            has_concepts=torch.tensor([bool(rec.captions) for _, _, rec in items], dtype=torch.bool),
            r_input_ids=r_ids,
            r_attention_mask=r_mask,
            r_labels=r_labels,
            r_img_idx=torch.tensor(r_img, dtype=torch.long),
            q_answers=answers,
            q_families=families,
            refs=refs,
            recipes=[rec.recipe for _, _, rec in items],
            ingredients=[list(rec.ingredients) for _, _, rec in items],
        )
