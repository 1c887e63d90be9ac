"""The LightningDataModule: reads the splits through a reader, holds out validation images when a
dataset has none, builds the answer vocabulary from the training split, and serves multi-task
batches of whole images (see `mmqa.data.batch`)."""

from __future__ import annotations

from collections import Counter

import lightning as L
from torch.utils.data import DataLoader

from mmqa.data.batch import Collator, RecordDataset
from mmqa.data.images import ImageTransform
from mmqa.data.readers import DatasetReader, split_by_image
from mmqa.data.records import ImageRecord
from mmqa.errors import DataError
from mmqa.metrics.vqa import normalize_answer

SPLITS = ("train", "val", "test")


def build_answer_vocab(records: list[ImageRecord], top_k: int) -> list[str]:
    """The `top_k` most frequent normalised answers of the training split (ties broken alphabetically)."""
    counts = Counter(normalize_answer(a) for r in records for qa in r.questions for a in qa.answers)
    return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]]


class MMQADataModule(L.LightningDataModule):
    def __init__(
        self,
        reader: DatasetReader,
        image_size: int,
        mean: list[float],
        std: list[float],
        batch_size: int,
        eval_batch_size: int,
        num_workers: int,
        val_fraction: float,
        split_seed: int,
        answer_top_k: int,
        max_question_length: int,
        max_caption_length: int,
        max_captions_per_image: int,
        root: str | None = None,
    ):
        """`root` is the dataset directory for configs whose reader reads one (`data.root=...`); the
        reader's own config refers to it, the data module only records it."""
        super().__init__()
        self.root = root
        self.reader = reader
        self.transform = ImageTransform(image_size, mean, std)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.answer_top_k = answer_top_k
        self.collate_args = dict(
            max_question_length=max_question_length,
            max_caption_length=max_caption_length,
            max_captions_per_image=max_captions_per_image,
        )
        self.records: dict[str, list[ImageRecord]] = {}
        self.tokenizers = None

    def load_records(self) -> dict[str, list[ImageRecord]]:
        """Read every split once; without a val split, hold out a seeded slice of train by image."""
        if self.records:
            return self.records
        train = self.reader.read("train")
        if not train:
            raise DataError(f"{type(self.reader).__name__}: the dataset has no training split (or it is empty)")
        val = self.reader.read("val")
        if val is None:
            train, val = split_by_image(train, self.val_fraction, self.split_seed)
        self.records = {"train": train, "val": val, "test": self.reader.read("test") or []}
        return self.records

    def train_texts(self):
        """Questions and captions of the training split, to fit a tokenizer on."""
        for r in self.load_records()["train"]:
            yield from (qa.question for qa in r.questions)
            yield from r.captions

    def families(self, split: str = "train") -> list[str]:
        return sorted({qa.family for r in self.load_records()[split] for qa in r.questions if qa.family})

    def answer_vocab(self) -> list[str]:
        return build_answer_vocab(self.load_records()["train"], self.answer_top_k)

    def attach(self, text_tokenizer, decoder_tokenizer, answers: list[str]) -> None:
        """Give the module what the model side decides: tokenizers and the answer vocabulary."""
        self.tokenizers = (text_tokenizer, decoder_tokenizer)
        self.answers = answers

    def loader(self, split: str, train: bool) -> DataLoader:
        if self.tokenizers is None:
            raise RuntimeError("MMQADataModule.attach(...) must be called before asking for data loaders")
        collate = Collator(*self.tokenizers, self.answers, train=train, **self.collate_args)
        return DataLoader(
            RecordDataset(self.load_records()[split], self.transform),
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", train=False)
