"""The start-up check of a composed training config: every key known, every value of its type, no
combination that cannot work. `train()` calls `check_config` before anything is read or built, and
all problems come back at once in one `ConfigError` that names each key and lists the valid ones.

Hydra itself refuses an override of a key that does not exist (`optim.lrr=1`) and an unknown option
of a group (`model/fusion=mid`, with the list of options). What it lets through, and this catches:
a key added with `+` or misspelt inside a YAML file, a value of the wrong type (`data.batch_size=abc`)
and impossible combinations. The valid keys come from where they are used, so no number is written
twice: the dataclasses below for the sections without a `_target_` (their values stay in conf/), the
tasks of `mmqa.lit_module` for `loss`, transformers' `GenerationConfig` for `generation`, and the
signature of the class or function a `_target_` names for every node that has one (a key it does
not take is a typo; a value whose type its annotation rules out would fail there later).
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from functools import cache
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from mmqa.data.validate import ON_BAD_SAMPLE
from mmqa.errors import ConfigError

HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


@dataclass
class Optim:
    lr: float
    weight_decay: float
    betas: list[float]
    warmup_fraction: float


@dataclass
class Tokenizer:
    vocab_size: int
    min_frequency: int


@dataclass
class Eval:
    max_caption_eval_images: int


@dataclass
class Recipe:
    ingredient_threshold: float
    prompt_threshold: float
    ban_absent_ingredients: bool
    generation: dict


@dataclass
class TrainConfig:
    """The top level of conf/train.yaml; the groups are checked through their `_target_`s."""

    task_name: str
    seed: int
    ckpt_path: str | None
    optimized_metric: str | None
    optim: Optim
    tokenizer: Tokenizer
    generation: dict
    eval: Eval
    recipe: Recipe
    loss: dict
    data: Any
    model: Any
    trainer: Any
    logger: Any
    callbacks: Any
    paths: Any


def check_config(cfg: DictConfig) -> None:
    """Raise one `ConfigError` listing every problem of `cfg` (a composed conf/train.yaml)."""
    problems: list[str] = []
    _check_fields(cfg, TrainConfig, "", problems)
    if not problems:  # the combinations read keys that must exist with the right types
        _check_combinations(cfg, problems)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"invalid config ({len(problems)} problem{'s' * (len(problems) > 1)}):\n{listed}")


# ------------------------------------------------------------------------------------- keys, types


def _check_fields(node: DictConfig, schema: type, path: str, problems: list[str]) -> None:
    """`node` against the dataclass `schema`: no unknown key, no missing one, each value of its type."""
    hints = _hints(schema)
    for key in node:
        where = f"{path}{key}"
        if key not in hints:
            problems.append(f"{where}: unknown key{_did_you_mean(key, hints)}; valid keys: {', '.join(sorted(hints))}")
            continue
        _check_value(node, key, hints[key], where, problems)
    problems += [f"{path}{k}: missing" for k in hints if k not in node]


def _check_value(node: DictConfig, key: str, hint: Any, where: str, problems: list[str]) -> None:
    try:
        value = node[key]
    except Exception:  # noqa: BLE001 - an interpolation only Hydra's runtime resolves; not this check's business
        return
    schema = next((h for h in (hint, *typing.get_args(hint)) if is_dataclass(h)), None)  # also `X | None`
    if schema is not None and not (value is None and _matches(None, hint)):
        if isinstance(value, DictConfig):
            _check_fields(value, schema, f"{where}.", problems)
        else:
            problems.append(f"{where}: expected a section with keys {', '.join(_hints(schema))}, got {value!r}")
    elif where == "loss":
        _check_loss(value, problems)
    elif where in ("generation", "recipe.generation"):
        _check_generation(value, where, problems)
    elif isinstance(value, DictConfig) and "_target_" in value:
        _check_target(value, f"{where}.", problems)
    elif isinstance(value, DictConfig) and where in ("callbacks", "logger"):
        for name in value:  # named entries, each a `_target_` node or null (switched off)
            if isinstance(value[name], DictConfig):
                _check_target(value[name], f"{where}.{name}.", problems)
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
            _check_value(node, key, accepted[key], f"{path}{key}", problems)
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


@cache
def _hints(schema: type) -> dict[str, Any]:
    resolved = typing.get_type_hints(schema)
    return {f.name: resolved[f.name] for f in fields(schema)}


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


def _check_loss(loss: Any, problems: list[str]) -> None:
    from mmqa.lit_module import TASKS  # the loss terms are the LightningModule's

    if not isinstance(loss, DictConfig):
        problems.append(f"loss: expected a weight per task ({', '.join(TASKS)}), got {loss!r}")
        return
    for key in loss:
        if key not in TASKS:
            problems.append(f"loss.{key}: unknown loss term{_did_you_mean(key, TASKS)}; valid: {', '.join(TASKS)}")
        elif not _matches(loss[key], float) or loss[key] < 0:
            problems.append(f"loss.{key}: expected a weight >= 0, got {loss[key]!r}")


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
    need(len(d.mean) == 3 and len(d.std) == 3 and all(s > 0 for s in d.std),
         f"data.mean and data.std need 3 values (R, G, B), std > 0; got {list(d.mean)} and {list(d.std)}")
    need(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    need(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas needs two values in [0, 1), got {list(o.betas)}")
    need(0 <= o.warmup_fraction < 1, f"optim.warmup_fraction must be in [0, 1), got {o.warmup_fraction}")
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
