"""The LightningDataModule: reads the splits through a reader, checks every image once and drops or
refuses bad samples (`on_bad_sample`, see `mmqa.data.validate`), holds out validation images when a
dataset has none, builds the answer, ingredient and caption-concept vocabularies from the training split, and serves multi-task
batches of whole images (see `mmqa.data.batch`) in an order that a checkpoint can resume mid-epoch."""

from __future__ import annotations

import random
from collections import Counter

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from mmqa.data.augment import QuestionNoise
from mmqa.data.batch import Collator, RecordDataset
from mmqa.data.concepts import caption_words
from mmqa.data.images import ImageTransform
from mmqa.data.readers.base import DatasetReader, split_by_image
from mmqa.data.recipe_text import format_recipe, recipe_prompt
from mmqa.data.records import ImageRecord
from mmqa.data.validate import SkipLog, check_images
from mmqa.errors import DataError
from mmqa.metrics.vqa import normalize_answer

# test_paraphrase: the test questions reworded in ways training never used (the built-in worlds write
# it; a user's dataset may bring its own test_paraphrase.jsonl). Like test, it is optional.
SPLITS = ("train", "val", "test", "test_paraphrase")


def most_frequent(counts: Counter, top_k: int) -> list[str]:
    """The `top_k` most frequent keys, most frequent first, ties broken alphabetically."""
    return [k for k, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]]


def build_answer_vocab(records: list[ImageRecord], top_k: int) -> list[str]:
    """The `top_k` most frequent normalised answers of the training split (ties broken alphabetically)."""
    return most_frequent(Counter(normalize_answer(a) for r in records for qa in r.questions for a in qa.answers), top_k)


class EpochOrder(Sampler[int]):
    """The training order: a shuffle that depends on (seed, epoch) alone, so a resumed run sees the
    order the uninterrupted run saw; `start` skips the part of an epoch that was already trained."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this before every epoch
        self.epoch = epoch

    def __iter__(self):
        order = list(range(self.n))
        random.Random(f"mmqa-order:{self.seed}:{self.epoch}").shuffle(order)
        start, self.start = self.start, 0
        return iter(order[start:])

    def __len__(self) -> int:
        return self.n


class ResumableLoader(DataLoader):
    """The training loader, with a position: the epoch and how many of its batches were served. A
    resumed run serves the rest of that epoch in the same order, so resuming mid-epoch gives the
    uninterrupted run's batches. The data module carries the position in checkpoints: Lightning
    builds the loader (to count the steps of the schedule) before it restores its loops, so the
    state Lightning keeps for a loader with `state_dict` would come too late."""

    def __init__(self, dataset, batch_size: int, seed: int, **kwargs):
        self.order = EpochOrder(len(dataset), seed)
        super().__init__(dataset, batch_size=batch_size, sampler=self.order, generator=torch.Generator(), **kwargs)
        self.served = 0  # batches of the current epoch handed out

    def __iter__(self):
        # worker seeds are drawn from `generator`: per epoch, so they too survive a resume
        self.generator.manual_seed(hash((self.order.seed, self.order.epoch)))
        self.served = self.order.start // self.batch_size
        batches = super().__iter__()
        for batch in batches:
            self.served += 1
            yield batch

    def state_dict(self) -> dict:
        return {"seed": self.order.seed, "epoch": self.order.epoch, "batches": self.served}

    def load_state_dict(self, state: dict) -> None:
        self.order.seed = state["seed"]
        if state["batches"] >= len(self):  # saved at the end of an epoch: the next one starts afresh
            self.order.set_epoch(state["epoch"] + 1)
        else:
            self.order.set_epoch(state["epoch"])
            self.order.start = state["batches"] * self.batch_size


class MMQADataModule(L.LightningDataModule):
    def __init__(
        self,
        reader: DatasetReader,
        image_size: int,
        batch_size: int,
        eval_batch_size: int,
        num_workers: int,
        val_fraction: float,
        split_seed: int,
        answer_top_k: int,
        max_question_length: int,
        max_caption_length: int,
        max_captions_per_image: int,
        max_recipe_length: int,
        ingredient_top_k: int,
        concept_top_k: int,
        on_bad_sample: str,
        root: str | None = None,
        question_noise: QuestionNoise | None = None,
        vqa_family_weight: dict[str, float] | None = None,
    ):
        """`root` is the dataset directory for configs whose reader reads one (`data.root=...`); the
        reader's own config refers to it, the data module only records it. `on_bad_sample`: 'raise'
        stops at the first bad sample, 'skip' drops bad samples and lists them in `self.skip_log`.
        `question_noise`: made-up words in training questions (`mmqa.data.augment`).
        `vqa_family_weight`: question family -> factor on its questions' VQA loss in training (the
        others keep 1); a dataset's own, as its families are (`LitMMQA` applies and checks them)."""
        super().__init__()
        self.root = root
        self.reader = reader
        self.skip_log = SkipLog(on_bad_sample)
        self.image_size = image_size
        self.transform: ImageTransform | None = None  # set by `attach`: the normalisation is the image encoder's
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.answer_top_k = answer_top_k
        self.ingredient_top_k = ingredient_top_k
        self.concept_top_k = concept_top_k
        self.vqa_family_weight = dict(vqa_family_weight or {})  # carried to the LightningModule, which applies it
        self.question_noise = question_noise if question_noise is not None and question_noise.active else None
        self.collate_args = dict(
            max_question_length=max_question_length,
            max_caption_length=max_caption_length,
            max_captions_per_image=max_captions_per_image,
            max_recipe_length=max_recipe_length,
        )
        self.records: dict[str, list[ImageRecord]] = {}
        self.tokenizers = None
        self._train_loader: ResumableLoader | None = None
        self._resume_position: dict | None = None  # from a checkpoint, for the next training loader

    def load_records(self) -> dict[str, list[ImageRecord]]:
        """Read and check every split once; without a val split, hold out a seeded slice of train by image."""
        if self.records:
            return self.records
        log = self.skip_log
        read = {"train": self.reader.read("train", on_bad=log.reader_callback("train"))}
        if not read["train"]:
            raise DataError(f"{type(self.reader).__name__}: the dataset has no training split (or it is empty)")
        read |= {split: self.reader.read(split, on_bad=log.reader_callback(split)) for split in SPLITS[1:]}
        records = check_images({split: recs or [] for split, recs in read.items()}, log)
        if read["val"] is None:
            records["train"], records["val"] = split_by_image(records["train"], self.val_fraction, self.split_seed)
        if not records["train"]:
            raise DataError(f"{type(self.reader).__name__}: no training samples left: {log.summary()}")
        self.records = records
        return self.records

    def train_texts(self):
        """Questions, captions and recipes (with their ingredient prompts) of the training split, to fit
        a tokenizer on."""
        for r in self.load_records()["train"]:
            yield from (qa.question for qa in r.questions)
            yield from r.captions
            if r.recipe is not None:
                yield recipe_prompt(r.ingredients)
                yield format_recipe(r.recipe)

    def distinct_texts(self, split: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The split's distinct questions, then its distinct captions, each tokenised as a batch
        tokenises it: [(input_ids, attention_mask) of the questions, (...) of the captions]."""
        records = self.load_records()[split]
        questions = sorted({qa.question for r in records for qa in r.questions})
        captions = sorted({c for r in records for c in r.captions})
        collate = Collator(*self.tokenizers, self.answers, train=False, **self.collate_args)
        return [collate.encode_text(questions, collate.max_q), collate.encode_text(captions, collate.max_c)]

    def families(self, split: str = "train") -> list[str]:
        return sorted({qa.family for r in self.load_records()[split] for qa in r.questions if qa.family})

    def answer_vocab(self) -> list[str]:
        return build_answer_vocab(self.load_records()["train"], self.answer_top_k)

    def ingredient_vocab(self) -> list[str]:
        """The `ingredient_top_k` most frequent ingredient names of the training split (Recipe1M has
        thousands), sorted by name; empty for data without ingredients."""
        counts = Counter(name for r in self.load_records()["train"] for name in r.ingredients)
        return sorted(most_frequent(counts, self.ingredient_top_k))

    def concept_vocab(self) -> list[str]:
        """The `concept_top_k` caption words (`mmqa.data.concepts`) used by the most training images,
        sorted by name; empty for data without captions or with `concept_top_k` 0."""
        counts = Counter(w for r in self.load_records()["train"] for w in caption_words(r.captions))
        return sorted(most_frequent(counts, self.concept_top_k))

    def attach(
        self,
        text_tokenizer,
        decoder_tokenizer,
        answers: list[str],
        ingredients: list[str],
        concepts: list[str],
        normalization: tuple[list[float], list[float]],
    ) -> None:
        """Give the module what the model side decides: tokenizers, answer, ingredient and concept
        vocabularies, and the image encoder's (mean, std)."""
        self.tokenizers = (text_tokenizer, decoder_tokenizer)
        self.transform = ImageTransform(self.image_size, *normalization)
        self.answers = answers
        self.ingredients = list(ingredients)
        self.concepts = list(concepts)

    def loader(self, split: str, train: bool) -> DataLoader:
        if self.tokenizers is None:
            raise RuntimeError("MMQADataModule.attach(...) must be called before asking for data loaders")
        seed = torch.initial_seed()  # the run's seed (`seed_everything`)
        collate = Collator(
            *self.tokenizers, self.answers, train=train, ingredients=self.ingredients, concepts=self.concepts,
            question_noise=self.question_noise if train else None, seed=seed, **self.collate_args,
        )
        dataset = RecordDataset(self.load_records()[split], self.transform)
        args = dict(num_workers=self.num_workers, collate_fn=collate, persistent_workers=self.num_workers > 0)
        distributed = self.trainer is not None and self.trainer.world_size > 1
        if train and not distributed:
            # seeded by the run's seed (`seed_everything`); under DDP, Lightning's DistributedSampler
            # orders by (seed, epoch) instead, and a mid-epoch resume replays the epoch's first batches
            loader = self._train_loader = ResumableLoader(dataset, self.batch_size, seed=seed, **args)
            if self._resume_position is not None:
                loader.load_state_dict(self._resume_position)
                self._resume_position = None
            return loader
        return DataLoader(dataset, batch_size=self.batch_size if train else self.eval_batch_size, shuffle=train, **args)

    def state_dict(self) -> dict:
        """Saved in every checkpoint (Lightning calls it): where the training order stands."""
        return {"train_position": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state: dict) -> None:
        """On resume, before Lightning asks for the training loader."""
        self._resume_position = state.get("train_position")

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", train=False)
