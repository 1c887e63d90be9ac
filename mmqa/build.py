"""Turning a composed config into objects: tokenizers, the model, the data module and the
LightningModule. Training, evaluation and `Bundle.load` all build through here, so a bundle is
rebuilt exactly the way it was trained (no hidden constructor arguments), and there is one place
that assembles the LightningModule."""

from __future__ import annotations

from collections.abc import Iterable

from hydra.utils import instantiate
from omegaconf import DictConfig

import mmqa.config_check  # noqa: F401 - registers conf/train.yaml's schema (train_schema) with Hydra
from mmqa.compress.distill import Distiller
from mmqa.compress.lora import adapt
from mmqa.data.datamodule import SPLITS, MMQADataModule
from mmqa.data.tokenizer import load_tokenizer, train_tokenizer
from mmqa.errors import ConfigError
from mmqa.lit_module import LitMMQA
from mmqa.models.mmqa_model import MMQAModel


def build_tokenizers(model_cfg: DictConfig, tokenizer_cfg: DictConfig, texts: Iterable[str]):
    """(text tokenizer, decoder tokenizer): a pretrained model's own, else one fitted to `texts`."""
    trained = None

    def fitted():
        nonlocal trained
        if trained is None:
            trained = train_tokenizer(texts, tokenizer_cfg.vocab_size, tokenizer_cfg.min_frequency,
                                      tokenizer_cfg.spelling_variants)
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


def build_lit_module(cfg: DictConfig, model: MMQAModel, dm: MMQADataModule, split: str = "train",
                     train: bool = True, distiller: Distiller | None = None) -> LitMMQA:
    """The LightningModule for `cfg` (a composed train config, or a bundle's stored one) around
    `model`, with the vocabularies `dm` was given (`MMQADataModule.attach`). `split`: the split whose
    question families are scored; `train=False` leaves out the optimiser and schedule (evaluation)."""
    return LitMMQA(
        model,
        answers=dm.answers,
        families=dm.families(split),
        decoder_tokenizer=dm.tokenizers[1],
        loss_weights=cfg.loss,
        optimizer=instantiate(cfg.optim) if train else None,
        scheduler=instantiate(cfg.scheduler) if train else None,
        generation=cfg.generation,
        max_caption_eval_images=cfg.eval.max_caption_eval_images,
        ingredients=dm.ingredients,
        recipe=cfg.get("recipe"),
        concepts=dm.concepts,
        distiller=distiller,
        lr_scale=cfg.get("lr_scale"),
        family_weight=dm.vqa_family_weight if train else None,
    )


def build_experiment(cfg: DictConfig, assets: tuple | None = None) -> tuple[MMQADataModule, LitMMQA]:
    """The data module (records read, tokenizers, vocabularies and image normalisation attached) and
    the LightningModule for `cfg`. `assets` = (text tokenizer, decoder tokenizer, answers,
    ingredients) to reuse; without it they are built from the training split."""
    dm = instantiate(cfg.data)
    dm.load_records()
    teacher = load_teacher(cfg, dm)
    if assets is None and teacher is not None:  # the student reads and answers with the teacher's vocabularies
        assets = (teacher.text_tokenizer, teacher.decoder_tokenizer, teacher.answers, teacher.ingredients)
    if assets is None:
        text_tok, dec_tok = build_tokenizers(cfg.model, cfg.tokenizer, dm.train_texts())
        assets = (text_tok, dec_tok, dm.answer_vocab(), dm.ingredient_vocab())
    text_tok, dec_tok, answers, ingredients = assets
    model = build_model(cfg.model, len(answers), text_tok, dec_tok, len(ingredients))
    adapt(model, cfg)  # frozen towers and LoRA adapters: how it trains (a bundle holds the merged model)
    # from the data each time (only the training-time concept head uses it); none when the loss is off
    concepts = dm.concept_vocab() if cfg.loss.concepts > 0 else []
    dm.attach(text_tok, dec_tok, answers, ingredients, concepts, normalization=model.image_encoder.normalization)
    positions = model.decoder.gpt2.config.n_positions
    if cfg.data.max_recipe_length > positions and any(r.recipe for r in dm.records["train"]):
        raise ConfigError(
            f"data.max_recipe_length={cfg.data.max_recipe_length} exceeds the decoder's {positions} positions "
            f"(model.decoder.max_length): use experiment=recipes, or raise model.decoder.max_length"
        )
    distiller = None
    if teacher is not None:
        d = cfg.distill
        distiller = Distiller(teacher.model, d.temperature, d.vqa, d.caption, d.vqa_form, cfg.text_cache)
    return dm, build_lit_module(cfg, model, dm, distiller=distiller)


def load_teacher(cfg: DictConfig, dm: MMQADataModule):
    """The bundle `distill.teacher` names (None without one), checked against the data: its answer
    vocabulary must be the one this data gives, or the soft answers would mean other answers."""
    path = (cfg.get("distill") or {}).get("teacher")
    if not path:
        if cfg.get("task_name") == "distill":  # experiment=distill names its runs so
            raise ConfigError("distill.teacher is required by experiment=distill: distill.teacher=<run>/bundle")
        return None
    from mmqa.bundle import Bundle  # the bundle builds through this module

    teacher = Bundle.load(path)
    answers = dm.answer_vocab()
    if list(teacher.answers) != list(answers):
        new, gone = sorted(set(answers) - set(teacher.answers)), sorted(set(teacher.answers) - set(answers))
        raise ConfigError(
            f"distill.teacher={path}: its answer vocabulary ({len(teacher.answers)} answers, answers.json) is not "
            f"this data's ({len(answers)}): only in the data {new[:5]}, only in the teacher {gone[:5]}"
            + ("" if new or gone else ", same answers in another order")
            + "; distil on the data the teacher was trained on"
        )
    return teacher


def first_batches(data_cfg: DictConfig, bundle, split: str, n: int) -> tuple[LitMMQA, list]:
    """(an evaluation LitMMQA around `bundle`'s model, the first batches of `split` holding at least
    `n` questions): what inspect and compress read a bundle's behaviour from."""
    dm = data_for_bundle(data_cfg, bundle, split)
    lit = build_lit_module(bundle.cfg, bundle.model, dm, split=split, train=False)
    batches, seen = [], 0
    for batch in dm.loader(split, train=False):
        batches.append(batch)
        seen += batch.num_questions
        if seen >= n:
            break
    return lit, batches


def test_split(trainer, lit: LitMMQA, dm: MMQADataModule, split: str, **test_kwargs) -> dict[str, float]:
    """Lightning's test loop on `split`, its metrics named after it ("test_paraphrase/vqa_acc"):
    the loop itself logs every split under "test/". `test_kwargs` go to `trainer.test` (ckpt_path)."""
    (result,) = trainer.test(lit, dataloaders=dm.loader(split, train=False), verbose=False, **test_kwargs)
    return {f"{split}/{k.split('/', 1)[1]}": float(v) for k, v in result.items()}


def data_for_bundle(data_cfg: DictConfig, bundle, split: str) -> MMQADataModule:
    """A data module for `data_cfg` that reads `split` as `bundle` was trained to: its preprocessing
    (image size, text lengths) and its vocabularies (tokenizers, answers, ingredients)."""
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not a split; valid: {', '.join(SPLITS)}")
    for key in ("image_size", "max_question_length", "max_caption_length", "max_recipe_length"):
        if key in bundle.cfg.data:  # the bundle's preprocessing wins: the model was trained with it
            data_cfg[key] = bundle.cfg.data[key]
    dm = instantiate(data_cfg)
    if not dm.load_records()[split]:
        raise ConfigError(f"split={split!r}: the dataset has no {split} split")
    dm.attach(bundle.text_tokenizer, bundle.decoder_tokenizer, bundle.answers, bundle.ingredients, [],
              normalization=bundle.model.image_encoder.normalization)
    return dm

