"""Turning a composed config into objects: tokenizers and the model. Used by training, evaluation and
`Bundle.load`, so a bundle is rebuilt exactly the way it was trained (no hidden constructor args)."""

from __future__ import annotations

from collections.abc import Iterable

from hydra.utils import instantiate
from omegaconf import DictConfig

from mmqa.data.tokenizer import load_tokenizer, train_tokenizer
from mmqa.models.mmqa_model import MMQAModel


def build_tokenizers(model_cfg: DictConfig, tokenizer_cfg: DictConfig, texts: Iterable[str]):
    """(text tokenizer, decoder tokenizer): a pretrained model's own, else one fitted to `texts`."""
    trained = None

    def fitted():
        nonlocal trained
        if trained is None:
            trained = train_tokenizer(texts, tokenizer_cfg.vocab_size, tokenizer_cfg.min_frequency)
        return trained

    # a `tokenizer` key (open_clip text towers) names the tokenizer apart from the weights
    text_cfg = model_cfg.text_encoder
    text_src = text_cfg.tokenizer if "tokenizer" in text_cfg else text_cfg.get("pretrained")
    dec_src = model_cfg.decoder.get("pretrained")
    text_tok = load_tokenizer(text_src) if text_src else fitted()
    dec_tok = load_tokenizer(dec_src) if dec_src else fitted()
    return text_tok, dec_tok


def build_model(
    model_cfg: DictConfig, num_answers: int, text_tokenizer, decoder_tokenizer, num_ingredients: int = 0
) -> MMQAModel:
    """Instantiate the model tree from `model_cfg`, filling in the sizes that come from the data
    (answer and ingredient vocabularies; no ingredient head when the data has no ingredients)."""
    return instantiate(
        model_cfg,
        num_answers=num_answers,
        num_ingredients=num_ingredients,
        text_encoder={"vocab_size": len(text_tokenizer)},
        decoder={
            "vocab_size": len(decoder_tokenizer),
            "bos_token_id": decoder_tokenizer.bos_token_id,
            "eos_token_id": decoder_tokenizer.eos_token_id,
            "pad_token_id": decoder_tokenizer.pad_token_id,
        },
    )
