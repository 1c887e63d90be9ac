"""Unit tests of mmqa.metrics against values computed by hand: VQA normalisation and accuracy, caption
BLEU-4 / CIDEr, and retrieval recall in both directions."""

import math

import pytest
import torch

from mmqa.metrics import (
    CaptionScores,
    RetrievalRecall,
    VQAAccuracy,
    caption_scores,
    normalize_answer,
    retrieval_recall,
    soft_scores,
    tokenize_caption,
    vqa_score,
)

# ---------------------------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),
        ("none", "0"),
        ("the dog.", "dog"),
        ("A Dog", "dog"),
        ("dont", "don't"),
        ("isnt it", "isn't it"),
        ("yes!", "yes"),
        ("yes !", "yes"),
        ("1,000", "1000"),
        ("1,000 dogs!", "1000 dogs"),
        ("black/white", "black white"),
        ("3.5", "3.5"),
        ("  red\tand\nblue ", "red and blue"),
        ("dog's", "dog's"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    ("matches", "expected"),
    [
        (0, 0.0),
        (1, 0.3),  # 9 subsets hold the match: 9 * (1/3) / 10
        (2, 0.6),  # (2 * (1/3) + 8 * (2/3)) / 10
        (3, 0.9),  # (3 * (2/3) + 7 * 1) / 10
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_score_ten_annotators(matches, expected):
    answers = ["two"] * matches + ["three"] * (10 - matches)
    assert vqa_score("2", answers) == pytest.approx(expected)


def test_vqa_score_one_annotator_is_exact_match_after_normalisation():
    assert vqa_score("The Cat.", ["cat"]) == 1.0
    assert vqa_score("cats", ["cat"]) == 0.0


def test_vqa_score_two_annotators():
    # Subsets of one answer, threshold 1: the score is the fraction of annotators who agree.
    assert vqa_score("cat", ["cat", "dog"]) == pytest.approx(0.5)
    assert vqa_score("cat", ["cat", "Cat"]) == pytest.approx(1.0)
    assert vqa_score("bird", ["cat", "dog"]) == 0.0


def test_vqa_score_three_annotators():
    # Threshold 2: leaving out a "cat" leaves 1 match (1/2), leaving out "dog" leaves 2 (1): (2*0.5 + 1) / 3.
    assert vqa_score("cat", ["cat", "cat", "dog"]) == pytest.approx(2 / 3)


def test_vqa_score_rejects_no_answers():
    with pytest.raises(ValueError, match="at least one"):
        vqa_score("cat", [])


def test_soft_scores_equal_the_accuracy_of_each_answer():
    answers = ["yes"] * 4 + ["Yes!"] * 2 + ["no"] * 3 + ["maybe"]
    scores = soft_scores(answers)
    assert scores == pytest.approx({"yes": 1.0, "no": 0.9, "maybe": 0.3})
    for answer, score in scores.items():
        assert vqa_score(answer, answers) == pytest.approx(score)
    with pytest.raises(ValueError):
        soft_scores([])


def test_vqa_accuracy_per_family_and_overall():
    metric = VQAAccuracy(families=["count", "color", "shape"])
    metric.update(["2", "red"], [["two"] * 10, ["blue"] * 10], ["count", "color"])
    # A family outside the list and a question without family count in the overall mean only.
    metric.update(["yes", "cat"], [["yes"] * 3 + ["no"] * 7, ["cat"]], ["yes/no", None])
    out = metric.compute()
    assert set(out) == {"vqa_acc", "vqa_acc/count", "vqa_acc/color"}  # "shape" had no question
    assert out["vqa_acc"].item() == pytest.approx((1.0 + 0.0 + 0.9 + 1.0) / 4)
    assert out["vqa_acc/count"].item() == pytest.approx(1.0)
    assert out["vqa_acc/color"].item() == pytest.approx(0.0)

    metric.reset()
    metric.update(["red"], [["red"] * 10], ["color"])
    assert {k: v.item() for k, v in metric.compute().items()} == {"vqa_acc": 1.0, "vqa_acc/color": 1.0}


def test_vqa_accuracy_forward_returns_the_batch_and_accumulates():
    metric = VQAAccuracy(families=["count"])
    batch = metric(["2"], [["two"] * 3 + ["one"] * 7], ["count"])
    assert batch["vqa_acc"].item() == pytest.approx(0.9)
    metric(["1"], [["two"] * 10], ["count"])
    assert metric.compute()["vqa_acc/count"].item() == pytest.approx(0.45)


def test_vqa_accuracy_rejects_ragged_batches():
    with pytest.raises(ValueError, match="2 preds"):
        VQAAccuracy(families=[]).update(["a", "b"], [["a"]], [None, None])


# ------------------------------------------------------------------------------------------ captions

_CORPUS = {
    "1": ["a dog runs on the green grass", "a brown dog running outside"],
    "2": ["a cat sleeps on a red sofa", "the cat is asleep"],
    "3": ["two people ride bikes down a street", "cyclists on a city road"],
}


def test_tokenize_caption():
    assert tokenize_caption("  A Dog,  running.\n") == "a dog running"
    assert tokenize_caption("") == ""


def test_perfect_captions_score_bleu_one_and_positive_cider():
    hyps = {i: refs[0].capitalize() + "." for i, refs in _CORPUS.items()}  # tokenisation undoes the case
    scores = caption_scores(_CORPUS, hyps)
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["cider"] > 0
    worse = caption_scores(_CORPUS, {"1": "a dog", "2": "a red sofa", "3": "a street"})
    assert worse["cider"] < scores["cider"]


def test_bleu4_partial_match_by_hand():
    # Clipped n-gram precisions 5/6, 3/5, 2/4, 1/3, equal lengths so no brevity penalty.
    scores = caption_scores({"1": ["the cat sat on a mat"]}, {"1": "the cat sat on the mat"})
    assert scores["bleu4"] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, rel=1e-6)
    # On one image every n-gram's document frequency is the corpus size, so CIDEr's weights are all 0.
    assert scores["cider"] == 0.0


def test_bleu4_brevity_penalty_by_hand():
    # All n-grams match; 4 words against 6 give BP = exp(1 - 6/4).
    scores = caption_scores({"1": ["the cat sat on the mat"]}, {"1": "the cat sat on"})
    assert scores["bleu4"] == pytest.approx(math.exp(1 - 6 / 4), rel=1e-6)


def test_caption_scores_reject_mismatched_or_empty_input():
    with pytest.raises(ValueError, match=r"without a hypothesis: \['3'\]"):
        caption_scores(_CORPUS, {"1": "a dog", "2": "a cat"})
    with pytest.raises(ValueError, match=r"without references: \['9'\]"):
        caption_scores({"1": ["a dog"]}, {"1": "a dog", "9": "a cat"})
    with pytest.raises(ValueError):
        caption_scores({}, {})


def test_caption_scores_metric_accumulates_deduplicates_and_resets():
    ids = list(_CORPUS)
    hyps = {"1": "a dog runs on the grass", "2": "a cat on a sofa", "3": "people ride bikes"}
    expected = caption_scores(_CORPUS, hyps)

    metric = CaptionScores()
    metric.update(ids[:2], [hyps[i] for i in ids[:2]], [_CORPUS[i] for i in ids[:2]])
    # Padding repeats image "1" in the last batch; forward only accumulates.
    assert metric(["3", "1"], [hyps["3"], hyps["1"]], [_CORPUS["3"], _CORPUS["1"]]) is None
    out = metric.compute()
    assert out["bleu4"].item() == pytest.approx(expected["bleu4"], rel=1e-5)
    assert out["cider"].item() == pytest.approx(expected["cider"], rel=1e-5)

    metric.reset()
    metric.update(["1"], ["a dog runs on the green grass"], [_CORPUS["1"]])
    assert metric.compute()["bleu4"].item() == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------------------- retrieval

# Unit text vectors against the standard basis as images, so similarity (image i, text t) is TXT[t][i]:
#            t0    t1    t2    t3    t4
#   image 0  0.6   0.8   0     0.36  0.64
#   image 1  0.8   0.36  1     0.48  0.48
#   image 2  0     0.48  0     0.8   0.6
_TXT = torch.tensor(
    [[0.6, 0.8, 0.0], [0.8, 0.36, 0.48], [0.0, 1.0, 0.0], [0.36, 0.48, 0.8], [0.64, 0.48, 0.6]]
)
_TXT_IMG = torch.tensor([0, 1, 1, 2, 2])
# Text -> image ranks (0 = first): t0 1, t1 2, t2 0, t3 0, t4 1.
# Image -> text: image 0's only text t0 has t1 and t4 ahead (rank 2); image 1's first text t1 ranks
# fourth but its second text t2 ranks first (rank 0); image 2's t3 ranks first (rank 0).
_EXPECTED = {
    "r1_t2i": 2 / 5, "r2_t2i": 4 / 5, "r10_t2i": 1.0,
    "r1_i2t": 2 / 3, "r2_i2t": 2 / 3, "r10_i2t": 1.0,
}


def test_retrieval_recall_by_hand():
    # Scaled inputs: normalisation happens inside.
    out = retrieval_recall(2.0 * torch.eye(3), 3.0 * _TXT, _TXT_IMG, ks=(1, 2, 10))
    assert out == pytest.approx(_EXPECTED)


def test_retrieval_recall_default_ks_and_image_without_text():
    # A fourth image below every text's right image and with no text of its own changes nothing.
    img = torch.cat([torch.eye(3), torch.tensor([[0.0, 0.0, -1.0]])])  # (4, 3)
    out = retrieval_recall(img, _TXT, _TXT_IMG)
    assert out == pytest.approx(
        {"r1_t2i": 0.4, "r5_t2i": 1.0, "r10_t2i": 1.0, "r1_i2t": 2 / 3, "r5_i2t": 1.0, "r10_i2t": 1.0}
    )


def test_retrieval_recall_ties_count_against_the_query():
    out = retrieval_recall(torch.ones(2, 4), torch.ones(2, 4), torch.tensor([0, 1]), ks=(1, 2))
    assert out == pytest.approx({"r1_t2i": 0.0, "r2_t2i": 1.0, "r1_i2t": 0.0, "r2_i2t": 1.0})


def test_retrieval_recall_rejects_bad_image_index():
    with pytest.raises(ValueError, match="txt_img"):
        retrieval_recall(torch.eye(3), _TXT, torch.tensor([0, 1, 1, 2, 3]))


def test_retrieval_metric_deduplicates_images_across_ranks():
    img_ids = torch.tensor([30, 20, 10])  # global ids of images 0, 1, 2: unsorted, to test the mapping
    metric = RetrievalRecall(ks=(1, 2, 10))
    # "Rank 0" sees images 0 and 1; "rank 1" sees image 2 and, as sampler padding, image 0 again.
    metric.update(img_ids[[0, 1]], torch.eye(3)[[0, 1]], img_ids[_TXT_IMG[:3]], _TXT[:3])
    metric.update(img_ids[[2, 0]], torch.eye(3)[[2, 0]], img_ids[_TXT_IMG[3:]], _TXT[3:])
    out = metric.compute()
    assert {k: v.item() for k, v in out.items()} == pytest.approx(_EXPECTED)

    metric.reset()
    metric.update(torch.tensor([1]), torch.eye(3)[:1], torch.tensor([2]), _TXT[:1])
    with pytest.raises(ValueError, match=r"never passed as images: \[2\]"):
        metric.compute()


def test_breakdown_groups_by_family_and_phrasing_and_tabulates_confusion(tmp_path):
    """mmqa breakdown on hand-made records with a fake answerer: accuracies by hand, confusion counts."""
    from PIL import Image

    from mmqa.cli.breakdown import breakdown
    from mmqa.data.records import QA, ImageRecord

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    questions = [
        QA("what shape is the red object?", ["circle"], "attribute"),
        QA("what shape is the blue object?", ["square"], "attribute"),
        QA("what colour is the circle?", ["red"], "attribute"),
        QA("is there a circle?", ["yes"], "existence"),
    ]
    given = {"what shape is the red object?": "square", "what shape is the blue object?": "square",
             "what colour is the circle?": "red", "is there a circle?": "no"}
    records = [ImageRecord(tmp_path / "a.png", "a", questions), ImageRecord(tmp_path / "a.png", "b", [])]
    groups, confused = breakdown(records, lambda image, qs: [given[q] for q in qs], words=3, confusion="attribute")
    assert groups["attribute"] == (2 / 3, 3)
    assert groups["attribute: what shape is"] == (0.5, 2)
    assert groups["attribute: what colour is"] == (1.0, 1)
    assert groups["existence"] == (0.0, 1)
    assert confused == {"circle": {"square": 1}, "red": {"red": 1}, "square": {"square": 1}}
    # by template: the built-in world's wording, first words for a question no template wrote
    by_template = breakdown(records, lambda image, qs: [given[q] for q in qs], words=2, confusion=None, templates=True)[0]
    assert by_template["attribute: what shape is the {ref}?"] == (0.5, 2)
    assert by_template["attribute: what colour is the {ref}?"] == (1.0, 1)
    assert by_template["existence: is there {a_desc}?"] == (0.0, 1)


def test_template_of_names_the_wording_even_where_first_words_do_not():
    from mmqa.data.worlds.wordings import template_of

    assert template_of("compared with the red circle, is the blue square bigger?") == "compared with the {b}, is the {a} {cmp}?"
    assert template_of("is the red circle bigger compared to the blue square?") == "is the {a} {cmp} compared to the {b}?"
    assert template_of("is the red circle bigger than the blue square?") == "is the {a} {cmp} than the {b}?"
    assert template_of("is the red circle left of the blue square?") == "is the {a} {rel} the {b}?"
    assert template_of("is there a red circle in the image?") == "is there {a_desc} in the image?"
    assert template_of("what dish is this?") == "what dish is this?"
    assert template_of("why is the sky blue?") is None


def test_breakdown_ratios_compare_each_family_and_weigh_the_overall_by_questions():
    from mmqa.cli.breakdown import ratios

    test = {"attribute": (1.0, 3), "attribute: what shape is": (1.0, 2), "existence": (0.5, 1)}
    reworded = {"attribute": (0.5, 3), "attribute: tell me the": (0.5, 3), "existence": (0.5, 1)}
    out = ratios(reworded, test)
    assert out["attribute"] == (1.0, 0.5, 0.5) and out["existence"] == (0.5, 0.5, 1.0)
    assert out["all"] == pytest.approx((3.5 / 4, 2.0 / 4, (2.0 / 4) / (3.5 / 4)))
