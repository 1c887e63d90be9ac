"""Tokenizers. With randomly initialised text models, a WordPiece tokenizer is trained on the training
split's questions and captions (HF `tokenizers`) and saved with the run; pretrained models bring their
own through `AutoTokenizer`. One trained tokenizer serves both the text encoder ([CLS] ... [SEP]) and
the GPT-2 decoder ([BOS] ... [EOS], added by the collator). A fitted tokenizer reads the other spelling of
a word it knows as the one it knows (`SPELLINGS`: "color" as "colour"); `unknown_words` says which
words of a text a tokenizer has never seen whole."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mmqa.models.pretrained import load_pretrained

# American and British spellings of the same word (lower case). A fitted tokenizer rewrites the one its
# training text never uses into the one it does, so a model trained on "colour" reads "color" as
# "colour"; where the text uses both, or neither, the pair is left alone.
SPELLINGS = (
    ("color", "colour"), ("colors", "colours"), ("colored", "coloured"), ("colorful", "colourful"),
    ("gray", "grey"), ("grayish", "greyish"), ("center", "centre"), ("centered", "centred"),
    ("favorite", "favourite"), ("flavor", "flavour"), ("flavors", "flavours"), ("neighbor", "neighbour"),
    ("neighboring", "neighbouring"), ("donut", "doughnut"), ("yogurt", "yoghurt"),
)

SPECIALS = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", bos_token="[BOS]", eos_token="[EOS]")


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int,
                    spelling_variants: bool = True) -> PreTrainedTokenizerFast:
    """A lowercase WordPiece tokenizer fitted to `texts`; [PAD] has id 0.

    The vocabulary is built from word counts, not by `tokenizers`' WordPiece trainer: that trainer
    breaks ties between equally frequent merges in hash order, so two fits of the same text gave
    different vocabularies and two runs of one seed different models. Here it is the special
    tokens, every character (alone and as a "##" continuation, so any word can be spelled), then
    the words seen at least `min_frequency` times, most frequent first and ties alphabetical, up to
    `vocab_size`: the same text always gives the same ids. `spelling_variants`: add the `SPELLINGS`
    rewrites the text calls for to the tokenizer's normaliser (saved with it)."""
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in counts for c in w})
    vocab = list(SPECIALS.values()) + chars + [f"##{c}" for c in chars]
    taken = set(vocab)
    words = sorted((w for w, n in counts.items() if n >= min_frequency and w not in taken), key=lambda w: (-counts[w], w))
    vocab += words[: max(0, vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(vocab)}, unk_token=SPECIALS["unk_token"]))
    rewrites = spelling_rewrites(counts) if spelling_variants else []
    tok.normalizer = normalizers.Sequence([normalizer] + [normalizers.Replace(Regex(rf"\b{a}\b"), b) for a, b in rewrites])
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()
    cls, sep = SPECIALS["cls_token"], SPECIALS["sep_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)


def spelling_rewrites(counts: Counter[str]) -> list[tuple[str, str]]:
    """(unseen spelling, seen spelling) for each pair of `SPELLINGS` of which `counts` has one only."""
    return [(b, a) if counts[a] else (a, b) for a, b in SPELLINGS if bool(counts[a]) != bool(counts[b])]


def unknown_words(tokenizer, text: str) -> list[str]:
    """The words of `text` (as the tokenizer normalises and splits them) that it cannot read whole:
    for a fitted tokenizer, words not in its vocabulary (they fall apart into letters); for a
    pretrained one, words that become its unknown token. Each once, in order; punctuation is no word."""
    backend = tokenizer.backend_tokenizer
    text = backend.normalizer.normalize_str(text) if backend.normalizer else text
    words = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(text)] if backend.pre_tokenizer else text.split()
    known = backend.token_to_id  # one lookup; get_vocab() would copy the whole vocabulary per call
    fitted = tokenizer.unk_token == SPECIALS["unk_token"] and known(SPECIALS["bos_token"]) is not None
    out = []
    for w in words:
        if not any(c.isalnum() for c in w) or w in out:
            continue
        if known(w) is None if fitted else tokenizer.unk_token in tokenizer.tokenize(w):
            out.append(w)
    return out


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
