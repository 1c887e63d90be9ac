"""VQA accuracy: the official VQAv2 answer normalisation, the leave-one-annotator-out score, the soft
training targets derived from it, and a DDP-safe torchmetrics accumulator reported per question family.

The normalisation follows the VQA evaluation script (`vqaEval.py`, processPunctuation and
processDigitArticle) rule for rule, so accuracies here are comparable with published VQAv2 numbers.
"""

import re
from collections import Counter

import torch
import torchmetrics

# The official contractions table, verbatim. Two entries are kept exactly as the official script has
# them although they look wrong, because changing them would change scores: the capitalised keys
# ("Im", "Ive", "Id've", "I'dve") never match (words are lowercased before the lookup), and
# "somebody'd" maps to "somebodyd" (the table's one reversed entry).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# The official list: the period is handled by _PERIOD_STRIP, and the apostrophe, colon and the rest of
# ASCII punctuation are deliberately absent (they survive normalisation).
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
                "`", ",", "?", "!"]
# The official pattern is "(?!<=\d)(\.)(?!\d)": its "(?!<=\d)" is a malformed lookbehind that never
# fires, so in effect it strips every period not followed by a digit ("3.5" stays, "dog." loses it).
# This is that effective behaviour, written plainly.
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_answer(s: str) -> str:
    """Normalise an answer exactly as the official VQAv2 evaluation does.

    Lowercase; newlines and tabs become spaces; punctuation is removed (or turned into a space when it
    glues two words, e.g. "black/white" -> "black white"); number words become digits ("two" -> "2",
    "none" -> "0"); the articles a/an/the are dropped; apostrophe-less contractions get their apostrophe
    back ("dont" -> "don't").
    """
    text = s.lower().replace("\n", " ").replace("\t", " ").strip()
    # A mark touching a space ("yes !") or any digit-comma-digit ("1,000") means marks separate nothing,
    # so they are deleted; otherwise a mark stands between two words and becomes a space. The official
    # script tests the input text, not the text being rewritten, and so does this loop.
    has_number_comma = _COMMA_STRIP.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        if p + " " in text or " " + p in text or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out)
    words = [_NUMBER_WORDS.get(w, w) for w in out.split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def _leave_one_out_score(matches: int, n: int) -> float:
    """Mean over the n leave-one-annotator-out subsets of min(matches in subset / t, 1), in closed form.

    Dropping one of the `matches` agreeing annotators leaves matches - 1 in the subset; dropping any of
    the n - matches others leaves all of them.
    """
    if n == 1:
        return float(matches)
    t = min(3, n - 1)
    return (matches * min((matches - 1) / t, 1.0) + (n - matches) * min(matches / t, 1.0)) / n


def vqa_score(pred: str, answers: list[str]) -> float:
    """The official VQAv2 accuracy of `pred` against the annotators' `answers`, in [0, 1].

    With n annotators (n = 10 in VQAv2), the score is the mean over the n subsets that leave one
    annotator out of min(#subset answers equal to pred / 3, 1), after normalising everything with
    `normalize_answer`. Generalised to fewer annotators: n = 1 is exact match (1.0 or 0.0); for n >= 2
    the subsets have n - 1 answers and the threshold is t = min(3, n - 1), so that agreement of the whole
    subset always scores 1 (n = 2: 0.5 for matching one of two answers, 1.0 for matching both).

    Unlike the official script, which normalises only when the annotators disagree (VQAv2's answers
    come already normalised), pred and answers are always normalised here, so raw answers from any
    source compare fairly.
    """
    if not answers:
        raise ValueError("vqa_score needs at least one annotator answer, got an empty list")
    target = normalize_answer(pred)
    matches = sum(normalize_answer(a) == target for a in answers)
    return _leave_one_out_score(matches, len(answers))


def soft_scores(answers: list[str]) -> dict[str, float]:
    """The soft training target of each distinct normalised answer: the accuracy `vqa_score` would give
    a prediction of that answer, so that the classifier is trained towards the metric it is judged by."""
    if not answers:
        raise ValueError("soft_scores needs at least one annotator answer, got an empty list")
    counts = Counter(normalize_answer(a) for a in answers)
    return {a: _leave_one_out_score(c, len(answers)) for a, c in counts.items()}


class VQAAccuracy(torchmetrics.Metric):
    """Mean VQAv2 accuracy, overall and per question family (e.g. "count", "color", "yes/no").

    States are sums and counts reduced with "sum", so under DDP every rank computes the exact mean over
    all ranks' questions. Families outside the constructor's list, and questions without a family,
    count in the overall accuracy only.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, families: list[str], **kwargs) -> None:
        super().__init__(**kwargs)
        if len(set(families)) != len(families):
            raise ValueError(f"VQAAccuracy families must be distinct, got {families}")
        self.families = list(families)
        self._family_index = {f: i for i, f in enumerate(self.families)}
        # Sums are float64: a long evaluation adds hundreds of thousands of scores, which float32
        # would round visibly.
        self.add_state("family_sum", torch.zeros(len(families), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("family_count", torch.zeros(len(families), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: list[str], answers: list[list[str]], families: list[str | None]) -> None:
        """Score one batch: preds[i] against answers[i], filed under families[i] (None: no family)."""
        if not len(preds) == len(answers) == len(families):
            raise ValueError(
                f"VQAAccuracy.update needs one answer list and one family per prediction, got "
                f"{len(preds)} preds, {len(answers)} answer lists, {len(families)} families"
            )
        scores = [vqa_score(p, a) for p, a in zip(preds, answers)]
        sums = [0.0] * len(self.families)
        counts = [0] * len(self.families)
        for score, family in zip(scores, families):
            i = self._family_index.get(family)
            if i is not None:
                sums[i] += score
                counts[i] += 1
        # One host-to-device copy per state per batch, not one per question.
        self.family_sum += torch.tensor(sums, dtype=torch.float64, device=self.device)
        self.family_count += torch.tensor(counts, dtype=torch.long, device=self.device)
        self.total_sum += sum(scores)
        self.total_count += len(scores)

    def compute(self) -> dict[str, torch.Tensor]:
        """{"vqa_acc": overall mean, "vqa_acc/<family>": mean} for every family that has a question."""
        out = {"vqa_acc": (self.total_sum / self.total_count).float()}
        for i, family in enumerate(self.families):
            if self.family_count[i] > 0:
                out[f"vqa_acc/{family}"] = (self.family_sum[i] / self.family_count[i]).float()
        return out
