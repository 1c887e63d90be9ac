"""The configuration's contract, in two parts.

- **The schema** (`TrainConfig`, registered with Hydra's ConfigStore as `train_schema`, the first
  entry of conf/train.yaml's defaults): the keys of the sections that have no `_target_`, with their
  types. Hydra enforces it while composing, so an unknown key (`+seeed=1`, `loss.vqaa=1`), a missing
  one or a value of the wrong type (`loss.vqa=abc`) fails before anything runs, naming the key.
- **`check_config`**, which `train()` calls before anything is read or built, and which returns all
  problems at once in one `ConfigError`: every `_target_` node's keys must be parameters of the class
  or function it names, with values its annotations allow (`model.fusion.deptth`, `optim.lrr`,
  `data.batch_size=abc`: a key it does not take is a typo, found with the valid keys and the nearest
  one); `generation` keys must be options of transformers' `GenerationConfig`; and no combination
  of values may be one that cannot work (a contrastive loss with batch size 1, a width not divisible
  by its heads, ...).
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from functools import cache
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from mmqa.data.validate import ON_BAD_SAMPLE
from mmqa.errors import ConfigError

HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
TARGET_SECTIONS = ("data", "model", "optim", "scheduler", "trainer")  # each one `_target_` node
NAMED_TARGET_SECTIONS = ("callbacks", "logger")  # named entries, each a `_target_` node or null (off)


@dataclass
class Loss:
    """The weight of each loss term (mmqa/lit_module.py `TASKS`); 0 switches a term off."""

    vqa: float = MISSING
    caption: float = MISSING
    contrastive: float = MISSING
    concepts: float = MISSING
    ingredients: float = MISSING
    recipe: float = MISSING


@dataclass
class Tokenizer:
    vocab_size: int = MISSING
    min_frequency: int = MISSING
    spelling_variants: bool = MISSING


@dataclass
class Eval:
    max_caption_eval_images: int = MISSING


@dataclass
class Recipe:
    ingredient_threshold: float = MISSING
    prompt_threshold: float = MISSING
    ban_absent_ingredients: bool = MISSING
    generation: dict[str, Any] = MISSING


@dataclass
class Distill:
    teacher: str | None = MISSING
    temperature: float = MISSING
    vqa: float = MISSING
    vqa_form: str = MISSING
    caption: float = MISSING


@dataclass
class Lora:
    r: int = MISSING
    alpha: float = MISSING
    dropout: float = MISSING
    target: str = MISSING


@dataclass
class TrainConfig:
    """The top level of conf/train.yaml. The values live in the YAML files; this holds only names
    and types. Sections built with `_target_` are `Any` here: `check_config` checks them against
    the signature of what they build."""

    task_name: str = MISSING
    seed: int = MISSING
    ckpt_path: str | None = MISSING
    optimized_metric: str | None = MISSING
    tokenizer: Tokenizer = field(default_factory=Tokenizer)
    generation: dict[str, Any] = MISSING
    eval: Eval = field(default_factory=Eval)
    recipe: Recipe = field(default_factory=Recipe)
    loss: Loss = field(default_factory=Loss)
    distill: Distill = field(default_factory=Distill)
    compile: bool = MISSING
    freeze: list[str] = MISSING
    text_cache: int = MISSING
    text_cache_fill: int = MISSING
    lr_scale: dict[str, float] = MISSING
    lora: Lora = field(default_factory=Lora)
    data: Any = MISSING
    model: Any = MISSING
    optim: Any = MISSING
    scheduler: Any = MISSING
    trainer: Any = MISSING
    logger: Any = None
    callbacks: Any = None
    paths: Any = MISSING


ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def check_config(cfg: DictConfig) -> None:
    """Raise one `ConfigError` listing every problem of `cfg` (a composed conf/train.yaml)."""
    problems: list[str] = []
    _check_added_keys(cfg, "", problems)
    for section in TARGET_SECTIONS:
        _check_target(cfg[section], f"{section}.", problems)
    for section in NAMED_TARGET_SECTIONS:
        for name, node in (cfg.get(section) or {}).items():
            if isinstance(node, DictConfig):
                _check_target(node, f"{section}.{name}.", problems)
    for where in ("generation", "recipe.generation"):
        _check_generation(OmegaConf.select(cfg, where), where, problems)
    if not problems:  # the combinations read keys that must exist with the right types
        _check_combinations(cfg, problems)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"invalid config ({len(problems)} problem{'s' * (len(problems) > 1)}):\n{listed}")


def _check_added_keys(node: DictConfig, path: str, problems: list[str]) -> None:
    """Keys the schema does not have. Hydra refuses them in a YAML file, but lets `+key=value` on the
    command line add one even to a typed section; in a schema section such a key is a typo."""
    schema = OmegaConf.get_type(node)
    if not is_dataclass(schema):
        return  # an untyped section: its `_target_` signature is checked instead
    valid = [f.name for f in fields(schema)]
    for key in node:
        if key not in valid:
            problems.append(f"{path}{key}: unknown key{_did_you_mean(key, valid)}; valid keys: {', '.join(sorted(valid))}")
        elif isinstance(node._get_node(key), DictConfig):
            _check_added_keys(node[key], f"{path}{key}.", problems)


def _check_value(value: Any, hint: Any, where: str, problems: list[str]) -> None:
    if isinstance(value, DictConfig) and "_target_" in value:
        _check_target(value, f"{where}.", problems)
    elif not _matches(value, hint):
        problems.append(f"{where}: expected {_type_text(hint)}, got {value!r} ({type(value).__name__})")


def _check_target(node: DictConfig, path: str, problems: list[str]) -> None:
    """A `_target_` node: its keys must be parameters of the target, its values of their types."""
    try:
        target = get_object(node._target_)
    except Exception as e:  # noqa: BLE001 - any import failure: report it with the key
        problems.append(f"{path}_target_: cannot import {node._target_!r} ({type(e).__name__}: {e})")
        return
    params, hints, open_ended = _signature(target)
    accepted = {k: hints.get(k, Any) for k in params} | {k: Any for k in HYDRA_KEYS}
    for key in node:
        if key in accepted:
            try:
                value = node[key]
            except Exception:  # noqa: BLE001 - an interpolation only Hydra's runtime resolves; not this check's business
                continue
            _check_value(value, accepted[key], f"{path}{key}", problems)
        elif not open_ended:
            problems.append(f"{path}{key}: unknown key{_did_you_mean(key, params)}; "
                            f"{node._target_} takes: {', '.join(params)}")


@cache
def _signature(target: Any) -> tuple[list[str], dict[str, Any], bool]:
    """(parameter names, their type hints where they resolve, whether it takes **kwargs)."""
    func = inspect.unwrap(target.__init__ if inspect.isclass(target) else target)
    sig = inspect.signature(func)
    params = [n for n, p in sig.parameters.items()
              if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    open_ended = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # noqa: BLE001 - annotations naming what is only imported for type checkers
        hints = {}
    return params, hints, open_ended


def _matches(value: Any, hint: Any) -> bool:
    """Whether `value` (a config value) can be `hint`; hints this check does not model pass."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if isinstance(value, DictConfig) and "_target_" in value:
        return True  # built by instantiate before it reaches the target
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (ListConfig, list, tuple)):
            return False
        return origin is not list or not args or all(_matches(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, (DictConfig, dict))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def _type_text(hint: Any) -> str:
    """`int | None` -> "int or None", `Literal['a', 'b']` -> "one of 'a', 'b'"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_text(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if hint is type(None):
        return "None"
    return str(hint).replace("typing.", "") if origin else getattr(hint, "__name__", str(hint))


def _did_you_mean(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_generation(generation: Any, where: str, problems: list[str]) -> None:
    from transformers import GenerationConfig

    valid = sorted(k for k in vars(GenerationConfig()) if not k.startswith("_"))
    for key in generation or {}:
        if key not in valid:
            problems.append(f"{where}.{key}: not an option of transformers' generate"
                            f"{_did_you_mean(key, valid)}; see transformers.GenerationConfig")


# ------------------------------------------------------------------------------------- combinations


def _check_combinations(cfg: DictConfig, problems: list[str]) -> None:
    """Values that are each of the right type but cannot work, alone or together."""
    d, o, w = cfg.data, cfg.optim, {k: float(v) for k, v in cfg.loss.items()}

    def need(ok: bool, problem: str) -> None:
        if not ok:
            problems.append(problem)

    for term, weight in w.items():
        need(weight >= 0, f"loss.{term}: expected a weight >= 0, got {weight}")
    need(any(v > 0 for v in w.values()), f"loss: every weight is 0 ({dict(w)}): nothing to train; set one > 0")
    if w.get("contrastive", 0) > 0:
        need(d.batch_size >= 2, f"loss.contrastive={w['contrastive']} needs data.batch_size >= 2 (each image is "
                                f"contrasted with the other images of its batch), got {d.batch_size}; "
                                f"set loss.contrastive=0 or a larger batch")
    if w.get("caption", 0) > 0 or w.get("contrastive", 0) > 0:
        need(d.max_captions_per_image >= 1, "loss.caption and loss.contrastive use captions: "
                                            f"data.max_captions_per_image must be >= 1, got {d.max_captions_per_image}")
    if w.get("caption", 0) > 0:
        need(d.max_caption_length >= 3, "loss.caption: data.max_caption_length must be >= 3 (begin, a token, end), "
                                        f"got {d.max_caption_length}")
    need(d.get("on_bad_sample", "raise") in ON_BAD_SAMPLE,
         f"data.on_bad_sample: {d.get('on_bad_sample')!r} is not an option; valid: {', '.join(ON_BAD_SAMPLE)}")
    for key in ("batch_size", "eval_batch_size", "answer_top_k", "max_question_length", "image_size"):
        need(d[key] >= 1, f"data.{key} must be >= 1, got {d[key]}")
    need(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    need(d.get("concept_top_k", 0) >= 0, f"data.concept_top_k must be >= 0 (0: no concept loss), got {d.get('concept_top_k')}")
    need(0 < d.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    enc = cfg.model.image_encoder
    if "mean" in enc and "std" in enc:
        need(len(enc.mean) == 3 and len(enc.std) == 3 and all(s > 0 for s in enc.std),
             f"model.image_encoder.mean and .std need 3 values (R, G, B), std > 0; got {list(enc.mean)} and {list(enc.std)}")
    need(cfg.get("text_cache", 0) >= 0, f"text_cache must be >= 0 (0: no cache), got {cfg.get('text_cache')}")
    need(cfg.get("text_cache_fill", 0) >= 0, f"text_cache_fill must be >= 0 (0: no fill before training), got {cfg.get('text_cache_fill')}")
    for family, weight in (d.get("vqa_family_weight") or {}).items():
        need(isinstance(weight, (int, float)) and weight >= 0,
             f"data.vqa_family_weight.{family} must be a number >= 0, got {weight!r}")
    for tower, scale in (cfg.get("lr_scale") or {}).items():
        need(scale > 0, f"lr_scale.{tower} must be > 0 (freeze=[{tower}] keeps a tower as loaded), got {scale}")
    lora = cfg.get("lora")
    if lora is not None:
        need(lora.r >= 0, f"lora.r must be >= 0 (0: no LoRA), got {lora.r}")
        need(0 <= lora.dropout < 1, f"lora.dropout must be in [0, 1), got {lora.dropout}")
    need(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    need(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas needs two values in [0, 1), got {list(o.betas)}")
    warmup = cfg.scheduler.get("warmup_fraction")
    if warmup is not None:
        need(0 <= warmup < 1, f"scheduler.warmup_fraction must be in [0, 1), got {warmup}")
    decay = cfg.scheduler.get("decay_fraction")
    if decay is not None:
        need(0 < decay <= 1 - (warmup or 0), f"scheduler.decay_fraction must be in (0, 1 - warmup_fraction], got {decay}")
    need(cfg.generation.get("num_beams", 1) >= 1, f"generation.num_beams must be >= 1, got {cfg.generation.get('num_beams')}")
    patch = OmegaConf.select(cfg, "model.image_encoder.patch_size")
    if isinstance(patch, int) and patch > 0:
        need(d.image_size % patch == 0, f"data.image_size={d.image_size} is not a multiple of "
                                        f"model.image_encoder.patch_size={patch}")
        stem = OmegaConf.select(cfg, "model.image_encoder.stem_channels")
        if stem and not OmegaConf.select(cfg, "model.image_encoder.name"):
            from mmqa.models.image_encoders import stem_problem

            problem = stem_problem(list(stem), OmegaConf.select(cfg, "model.image_encoder.stem_strides"), patch)
            need(problem is None, problem or "")
    for name, node in _model_nodes(cfg.model, "model"):
        width = node.get("width", node.get("dim"))
        heads = node.get("heads")
        if isinstance(width, int) and isinstance(heads, int) and heads > 0:
            need(width % heads == 0, f"{name}: width {width} is not divisible by heads={heads}")


def _model_nodes(node: DictConfig, name: str):
    """(dotted name, node) for `node` and every section below it."""
    yield name, node
    for key in node:
        child = node[key]
        if isinstance(child, DictConfig):
            yield from _model_nodes(child, f"{name}.{key}")
