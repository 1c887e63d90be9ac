"""Tokenizers. With randomly initialised text models, a WordPiece tokenizer is trained on the training
split's questions and captions (HF `tokenizers`) and saved with the run; pretrained models bring their
own through `AutoTokenizer`. One trained tokenizer serves both the text encoder ([CLS] ... [SEP]) and
the GPT-2 decoder ([BOS] ... [EOS], added by the collator)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mmqa.models.pretrained import load_pretrained

SPECIALS = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", bos_token="[BOS]", eos_token="[EOS]")


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int) -> PreTrainedTokenizerFast:
    """A lowercase WordPiece tokenizer fitted to `texts`; [PAD] has id 0."""
    tok = Tokenizer(models.WordPiece(unk_token=SPECIALS["unk_token"]))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIALS.values())
    )
    tok.train_from_iterator(texts, trainer=trainer)
    cls, sep = SPECIALS["cls_token"], SPECIALS["sep_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerFast:
    """A saved tokenizer directory, `pkg:NAME`, or a hub name. Decoders need bos/eos/pad: GPT-2's
    tokenizer has no pad token, so its eos serves as pad (labels mask padding by position, not id)."""
    tok = load_pretrained(str(source), "tokenizer", AutoTokenizer.from_pretrained)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.bos_token is None:
        tok.bos_token = tok.cls_token
    if tok.eos_token is None:
        tok.eos_token = tok.sep_token
    return tok
