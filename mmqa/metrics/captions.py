"""Caption quality: BLEU-4 and CIDEr from the COCO reference scorers (pycocoevalcap), a pure-Python
stand-in for the COCO PTB tokenizer, and a torchmetrics accumulator that gathers captions across ranks.

METEOR, SPICE and the PTB tokenizer are left out on purpose: they need Java, and the project runs
without it.
"""

import re
import string

import torch
import torch.distributed as dist
import torchmetrics
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def tokenize_caption(s: str) -> str:
    """Lowercase, drop ASCII punctuation and collapse whitespace: "A dog, running." -> "a dog running".

    Close to what the COCO PTB tokenizer feeds the scorers, without its Java dependency; scores can
    differ from the official toolkit's in the last digit on text with contractions or hyphens.
    """
    return " ".join(_PUNCTUATION.sub(" ", s.lower()).split())


def caption_scores(refs: dict[str, list[str]], hyps: dict[str, str]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr of `hyps` against `refs`, as the COCO caption leaderboard computes them.

    refs maps an image id to its reference captions, hyps maps the same ids to one generated caption
    each. Both are tokenised with `tokenize_caption` first. CIDEr weights n-grams by their inverse
    document frequency over the reference corpus, so it is only meaningful on many images: on a single
    image every n-gram has zero weight and CIDEr is 0.
    """
    if not refs or not hyps:
        raise ValueError(f"caption_scores needs captions to score, got {len(refs)} refs and {len(hyps)} hyps")
    missing_hyps = sorted(set(refs) - set(hyps))
    missing_refs = sorted(set(hyps) - set(refs))
    if missing_hyps or missing_refs:
        raise ValueError(
            f"caption_scores needs the same ids in refs and hyps: ids without a hypothesis: {missing_hyps}; "
            f"ids without references: {missing_refs}"
        )
    empty = sorted(i for i, r in refs.items() if not r)
    if empty:
        raise ValueError(f"caption_scores needs at least one reference per id; ids without any: {empty}")
    # The scorers' input format: id -> list of tokenised strings, the hypothesis as a one-element list.
    gts = {i: [tokenize_caption(r) for r in refs[i]] for i in refs}
    res = {i: [tokenize_caption(hyps[i])] for i in refs}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


class CaptionScores(torchmetrics.Metric):
    """Accumulates (id, hypothesis, references) over an epoch and scores the whole corpus at the end.

    Captions are Python strings, which torchmetrics' tensor states cannot carry, so they are kept in
    plain lists and gathered across ranks with `all_gather_object` inside `compute`. An id seen twice
    (a DistributedSampler pads the last batch by repeating samples) is scored once.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._ids: list[str] = []
        self._hyps: list[str] = []
        self._refs: list[list[str]] = []

    def update(self, ids: list[str], hyps: list[str], refs: list[list[str]]) -> None:
        """Add one batch: hyps[i] is the generated caption of image ids[i], refs[i] its references."""
        if not len(ids) == len(hyps) == len(refs):
            raise ValueError(
                f"CaptionScores.update needs one hypothesis and one reference list per id, got "
                f"{len(ids)} ids, {len(hyps)} hyps, {len(refs)} reference lists"
            )
        self._ids.extend(str(i) for i in ids)
        self._hyps.extend(hyps)
        self._refs.extend(list(r) for r in refs)

    def forward(self, ids: list[str], hyps: list[str], refs: list[list[str]]) -> None:
        """Accumulate only and return None: a batch score would mislead, because CIDEr's n-gram weights
        come from the whole corpus, and the default forward would drop these lists when it resets."""
        self.update(ids, hyps, refs)

    def compute(self) -> dict[str, torch.Tensor]:
        """{"bleu4", "cider"} over every caption seen on every rank, as float tensors."""
        local = (self._ids, self._hyps, self._refs)
        if self._to_sync and self.distributed_available_fn():
            gathered = [None] * dist.get_world_size(self.process_group)
            dist.all_gather_object(gathered, local, group=self.process_group)
        else:
            gathered = [local]
        refs, hyps = {}, {}
        for ids, rank_hyps, rank_refs in gathered:
            for i, h, r in zip(ids, rank_hyps, rank_refs):
                hyps[i] = h
                refs[i] = r
        scores = caption_scores(refs, hyps)
        return {k: torch.tensor(v, dtype=torch.float32, device=self.device) for k, v in scores.items()}

    def reset(self) -> None:
        super().reset()
        self._ids.clear()
        self._hyps.clear()
        self._refs.clear()
