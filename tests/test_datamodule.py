"""The data module on a user's JSONL dataset: a held-out validation slice when val.jsonl is missing,
the answer vocabulary from the training split (top-K of normalised answers), and batches whose
families drive per-family metrics."""

from __future__ import annotations

import json

import pytest
from conftest import NORMALIZATION
from PIL import Image

from mmqa.data.datamodule import MMQADataModule, build_answer_vocab
from mmqa.data.readers.jsonl import JsonlReader
from mmqa.data.tokenizer import train_tokenizer
from mmqa.errors import DataError


def make_dataset(root, n_images=10, with_val=False):
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(n_images):
        Image.new("RGB", (16, 16), (i * 20, 0, 0)).save(root / "images" / f"{i}.png")
        lines.append({"image": f"images/{i}.png", "question": "how many?", "answers": ["Two", "2", "two"],
                      "captions": [f"picture {i}"], "question_type": "counting"})
        lines.append({"image": f"images/{i}.png", "question": "what colour?", "answers": ["red" if i % 4 else "the blue"],
                      "question_type": "attribute"})
    (root / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    if with_val:
        (root / "val.jsonl").write_text(json.dumps(lines[0]))
    return root


def datamodule(root, **kw):
    args = dict(image_size=16, batch_size=4, eval_batch_size=4, num_workers=0,
                val_fraction=0.2, split_seed=0, answer_top_k=2, max_question_length=16, max_caption_length=16,
                max_captions_per_image=2, max_recipe_length=64, ingredient_top_k=10, concept_top_k=0,
                on_bad_sample="raise")
    args.update(kw)
    return MMQADataModule(JsonlReader(root), **args)


def test_missing_val_holds_out_a_seeded_slice_of_train_by_image(tmp_path):
    dm = datamodule(make_dataset(tmp_path))
    rec = dm.load_records()
    assert len(rec["train"]) == 8 and len(rec["val"]) == 2 and rec["test"] == []
    assert not {r.id for r in rec["train"]} & {r.id for r in rec["val"]}
    again = datamodule(tmp_path).load_records()
    assert [r.id for r in again["val"]] == [r.id for r in rec["val"]]  # same seed, same slice
    other = datamodule(tmp_path, split_seed=1).load_records()
    assert [r.id for r in other["val"]] != [r.id for r in rec["val"]]


def test_present_val_split_is_used_as_is(tmp_path):
    rec = datamodule(make_dataset(tmp_path, with_val=True)).load_records()
    assert len(rec["train"]) == 10 and [r.id for r in rec["val"]] == ["images/0.png"]


def test_answer_vocabulary_is_top_k_normalised_training_answers(tmp_path):
    dm = datamodule(make_dataset(tmp_path), answer_top_k=2)
    # "Two", "2", "two" all normalise to "2"; "the blue" to "blue"
    assert dm.answer_vocab() == ["2", "red"]
    assert build_answer_vocab(dm.load_records()["train"], 10) == ["2", "red", "blue"]
    assert dm.families() == ["attribute", "counting"]


def test_batches_carry_families_and_soft_targets(tmp_path):
    dm = datamodule(make_dataset(tmp_path), answer_top_k=3)
    tok = train_tokenizer(dm.train_texts(), 100, 1)
    dm.attach(tok, tok, dm.answer_vocab(), dm.ingredient_vocab(), [], NORMALIZATION)
    batch = next(iter(dm.val_dataloader()))
    assert batch.images.shape == (2, 3, 16, 16)
    assert batch.q_families == ["counting", "attribute"] * 2
    assert batch.vqa_targets[0].tolist() == [1.0, 0.0, 0.0]  # three annotators agree on "2"


def test_loaders_before_attach_are_refused(tmp_path):
    dm = datamodule(make_dataset(tmp_path))
    with pytest.raises(RuntimeError, match="attach"):
        dm.train_dataloader()


def test_dataset_without_training_split_is_an_error(tmp_path):
    (tmp_path / "val.jsonl").write_text("")
    with pytest.raises(DataError, match="no training split"):
        datamodule(tmp_path).load_records()


def test_tokenizer_fit_is_deterministic_words_first_by_frequency():
    texts = ["the red circle", "the blue square", "the red cross?"] * 3
    a, b = train_tokenizer(texts, 100, 1), train_tokenizer(list(reversed(texts)), 100, 1)
    assert a.get_vocab() == b.get_vocab()  # the same text in another order: the same ids
    assert a.pad_token_id == 0
    vocab = sorted(a.get_vocab(), key=a.get_vocab().get)
    assert vocab[-6:] == ["the", "red", "blue", "circle", "cross", "square"]  # by count, ties alphabetical
    assert a.tokenize("the reds") == ["the", "red", "##s"]  # unseen words are spelt from known pieces
    capped = train_tokenizer(texts, len(vocab) - 2, 1)
    assert "cross" not in capped.get_vocab() and "square" not in capped.get_vocab()
