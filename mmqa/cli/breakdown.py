"""Error analysis of a bundle's answers, finer than the per-family metrics:
`python -m mmqa breakdown BUNDLE DATASET_DIR [--split test] [--words 3 | --templates] [--confusion FAMILY] [--against SPLIT]`.

Answers every question of a JSONL dataset split (the layout of data/README.md; the built-in worlds
are written in it) with `Bundle.answer_batch` (an image's questions in one batch, the image encoded once) and prints the official VQA accuracy (`vqa_score`) grouped
by question family and by the question's first `--words` words (which phrasings fail; with
`--templates`, by the built-in world's template that worded it, `mmqa.data.worlds.wordings`), the words of
the questions that the model's tokenizer does not know (on `--split test_paraphrase`: which reworded
questions it cannot read), then, for one family, which answer was given for which expected one (the
confusion). `--split test_paraphrase --against test` adds each family's accuracy on both splits and
their ratio: what rewording the same questions costs."""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable

from mmqa.data.images import load_image
from mmqa.data.readers.jsonl import JsonlReader
from mmqa.data.records import ImageRecord
from mmqa.data.tokenizer import unknown_words
from mmqa.data.worlds.wordings import template_of
from mmqa.metrics.vqa import normalize_answer, vqa_score


def breakdown(
    records: Iterable[ImageRecord], answer: Callable[[object, list[str]], list[str]], words: int, confusion: str | None,
    templates: bool = False,
) -> tuple[dict[str, tuple[float, int]], dict[str, Counter]]:
    """({group: (accuracy, questions)}, {expected answer: Counter(given answers)}) over every question;
    `answer(image, questions)` answers all the questions of one image. Groups are "family" and
    "family: first words" (with `templates`: "family: template", first words where no built-in
    template matches); the confusion is over `confusion`'s questions."""
    scores: dict[str, list[float]] = defaultdict(list)
    confused: dict[str, Counter] = defaultdict(Counter)
    for rec in records:
        if not rec.questions:
            continue
        image = load_image(rec.image)  # once per image, for all of its questions
        for qa, given in zip(rec.questions, answer(image, [qa.question for qa in rec.questions])):
            score = vqa_score(given, qa.answers)
            family = qa.family or "all"
            scores[family].append(score)
            phrasing = (templates and template_of(qa.question)) or " ".join(qa.question.split()[:words])
            scores[f"{family}: {phrasing}"].append(score)
            if family == confusion:
                expected = Counter(normalize_answer(a) for a in qa.answers).most_common(1)[0][0]
                confused[expected][normalize_answer(given)] += 1
    return {k: (sum(v) / len(v), len(v)) for k, v in sorted(scores.items())}, dict(sorted(confused.items()))


def ratios(groups: dict[str, tuple[float, int]], against: dict[str, tuple[float, int]]) -> dict[str, tuple[float, float, float]]:
    """{"all" and each family: (accuracy against, accuracy, ratio)} from two `breakdown` group tables;
    "all" weighs each family by its questions."""
    families = [k for k in groups if ":" not in k and k in against]

    def overall(table):
        return sum(table[f][0] * table[f][1] for f in families) / max(1, sum(table[f][1] for f in families))

    rows = {"all": (overall(against), overall(groups))} | {f: (against[f][0], groups[f][0]) for f in families}
    return {k: (a, b, b / a if a else float("nan")) for k, (a, b) in rows.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mmqa breakdown", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="a bundle directory written by train.py (<run>/bundle)")
    parser.add_argument("dataset", help="a JSONL dataset directory (e.g. data/shapes/shapes-<key>)")
    parser.add_argument("--split", default="test", help="train, val, test or test_paraphrase (default test)")
    parser.add_argument("--words", type=int, default=3, help="group phrasings by this many first words")
    parser.add_argument("--templates", action="store_true", help="group phrasings by the built-in world's template")
    parser.add_argument("--confusion", default=None, help="a question family whose answers to tabulate")
    parser.add_argument("--min-count", type=int, default=20, help="hide phrasing groups with fewer questions")
    parser.add_argument("--new-words", type=int, default=15, help="list this many of the most frequent unknown words")
    parser.add_argument("--against", default=None, help="another split (test) to compare each family's accuracy with")
    args = parser.parse_args(argv)

    from mmqa.bundle import Bundle

    bundle = Bundle.load(args.bundle)
    reader = JsonlReader(args.dataset)
    records, other = reader.read(args.split), reader.read(args.against) if args.against else None
    for split, read in ((args.split, records), (args.against, other)):
        if split and read is None:
            parser.error(f"{args.dataset} has no {split}.jsonl")
    def answer(image, questions: list[str]) -> list[str]:
        return [a.answer for a in bundle.answer_batch([image], questions)]  # the image encoded once

    groups, confused = breakdown(records, answer, args.words, args.confusion, args.templates)
    print(f"{'group':<60} {'accuracy':>8} {'questions':>9}")
    for name, (acc, n) in groups.items():
        if ":" not in name or n >= args.min_count:
            print(f"{name:<60} {acc:>8.3f} {n:>9}")
    new = Counter(w for r in records for qa in r.questions for w in unknown_words(bundle.text_tokenizer, qa.question))
    n_questions = sum(len(r.questions) for r in records)
    print(f"words new to the model: {', '.join(f'{w} {n}' for w, n in new.most_common(args.new_words)) or 'none'} "
          f"(in {n_questions} questions)")
    if other is not None:
        print(f"\n{'family':<12} {args.against:>16} {args.split:>16} {'ratio':>6}")
        for family, (a, b, r) in ratios(groups, breakdown(other, answer, args.words, None, args.templates)[0]).items():
            print(f"{family:<12} {a:>16.3f} {b:>16.3f} {r:>6.3f}")
    for expected, given in confused.items():
        total = sum(given.values())
        shown = ", ".join(f"{a} {c}" for a, c in given.most_common())
        print(f"{args.confusion} '{expected}' ({total}): {shown}")


if __name__ == "__main__":
    main()
