"""The data module on a user's JSONL dataset: a held-out validation slice when val.jsonl is missing,
the answer vocabulary from the training split (top-K of normalised answers), batches whose families
drive per-family metrics, the optional test_paraphrase split, the fitted tokenizer (spelling variants,
unknown words) and the noise on training questions."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from conftest import NORMALIZATION
from PIL import Image

from mmqa.data.augment import QuestionNoise
from mmqa.data.datamodule import MMQADataModule, build_answer_vocab
from mmqa.data.readers.jsonl import JsonlReader
from mmqa.data.tokenizer import load_tokenizer, spelling_rewrites, train_tokenizer, unknown_words
from mmqa.errors import ConfigError, DataError


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


def test_the_other_spelling_of_a_known_word_reads_as_the_known_one_and_survives_a_save(tmp_path):
    tok = train_tokenizer(["what colour is the gray circle?"], 100, 1)
    # "colour" and "gray" are what the text has: "color" and "grey" are read as them
    assert tok.tokenize("What COLOR is the grey circle?") == tok.tokenize("what colour is the gray circle?")
    tok.save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path).tokenize("what color") == ["what", "colour"]
    assert train_tokenizer(["what colour"], 100, 1, spelling_variants=False).tokenize("color")[0] == "c"
    both = train_tokenizer(["colour", "color"], 100, 1)  # the text spells it both ways: left alone
    assert both.tokenize("color colour") == ["color", "colour"]
    assert spelling_rewrites(Counter(["colour", "gray", "circle"])) == [("color", "colour"), ("grey", "gray")]


def test_unknown_words_are_the_ones_a_fitted_tokenizer_never_saw():
    tok = train_tokenizer(["what colour is the circle?", "how many circles?"], 100, 1)
    assert unknown_words(tok, "What colour is the circle?") == []
    assert unknown_words(tok, "tell me, tell me: what color is the circle!") == ["tell", "me"]  # once each
    assert unknown_words(tok, "how many circle-ish things?") == ["ish", "things"]


def test_question_noise_makes_up_words_and_inserts_them_from_the_rng_alone():
    noise = QuestionNoise(replace=0.5, insert=0.5)
    question = "what colour is the red circle ?"
    a, b = noise(question, random.Random(3)), noise(question, random.Random(3))
    assert a == b  # the rng decides everything: a resumed run draws the same words
    outs = [noise(question, random.Random(s)).split() for s in range(200)]
    assert all(len(o) in (7, 8) for o in outs)
    kept = sum(w in question.split() for o in outs for w in o) / sum(len(o) for o in outs)
    assert 0.4 < kept < 0.55  # half the words replaced, and an insert now and then
    assert QuestionNoise()(question, random.Random(0)) == question and not QuestionNoise().active
    rotated = [QuestionNoise(rotate=0.99)("is the circle small or large", random.Random(s)) for s in range(50)]
    assert all(sorted(r.split()) == sorted("is the circle small or large".split()) for r in rotated)
    assert "small or large is the circle" in rotated and "is the circle small or large" not in rotated
    with pytest.raises(ConfigError, match=r"data.question_noise.replace must be in \[0, 1\), got 1.5"):
        QuestionNoise(replace=1.5)


def test_only_training_batches_get_question_noise(tmp_path):
    dm = datamodule(make_dataset(tmp_path / "d"), question_noise=QuestionNoise(replace=0.9))
    tok = train_tokenizer(dm.train_texts(), 100, 1)
    dm.attach(tok, tok, dm.answer_vocab(), [], [], NORMALIZATION)
    random.seed(0)
    train_q = next(iter(dm.loader("train", train=True))).q_input_ids
    eval_q = next(iter(dm.loader("train", train=False))).q_input_ids
    known = {tok.convert_tokens_to_ids(w) for w in ("how", "many", "what", "colour")}
    whole = [sum(i in known for i in q.flatten().tolist()) for q in (train_q, eval_q)]
    assert whole[1] == 2 * len(eval_q) and whole[0] < whole[1] / 3  # 9 in 10 words made up in training


def test_a_test_paraphrase_file_is_read_as_its_own_split(tmp_path):
    root = make_dataset(tmp_path / "d", with_val=True)
    (root / "test.jsonl").write_text((root / "val.jsonl").read_text())
    line = json.loads((root / "val.jsonl").read_text())
    (root / "test_paraphrase.jsonl").write_text(json.dumps({**line, "question": "number?"}))
    records = datamodule(root).load_records()
    assert [qa.question for r in records["test_paraphrase"] for qa in r.questions] == ["number?"]
    assert datamodule(make_dataset(tmp_path / "e")).load_records()["test_paraphrase"] == []  # optional


def test_training_batches_are_the_same_from_a_worker_and_after_a_mid_epoch_resume(tmp_path):
    """The caption pick and the question noise are drawn from the batch's own seed, not a process's
    random state: one loader worker gives the main process's batches, and a loader resumed at batch 2
    gives the batches the uninterrupted epoch gave from there."""
    root = make_dataset(tmp_path, n_images=12)
    lines = [json.loads(x) for x in (root / "train.jsonl").read_text().splitlines()]
    for x in lines:  # five captions per image, two drawn per step: the pick matters
        if "captions" in x:
            x["captions"] = [f"{x['captions'][0]} take {k}" for k in range(5)]
    (root / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines))

    def batches(workers, resume_at=None):
        dm = datamodule(root, num_workers=workers, question_noise=QuestionNoise(insert=0.5))
        tok = train_tokenizer(dm.train_texts(), 100, 1)
        dm.attach(tok, tok, dm.answer_vocab(), [], [], NORMALIZATION)
        loader = dm.loader("train", train=True)
        if resume_at is not None:
            loader.load_state_dict({"seed": loader.order.seed, "epoch": 0, "batches": resume_at})
        return [(b.c_input_ids.tolist(), b.q_input_ids.tolist(), b.image_ids.tolist()) for b in loader]

    main = batches(0)
    assert len(main) == 3 and len({str(b[0]) for b in main}) == 3
    assert batches(1) == main
    assert batches(0, resume_at=2) == main[2:]
