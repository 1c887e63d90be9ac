"""Training a pretrained tower cheaply: LoRA adapters (peft) on the linear layers whose names match a
pattern, and whole towers frozen. This is how a model trains, not what it is: a bundle holds the
ordinary model with every adapter merged into its base weight (`merged`, so serving costs exactly
what the base model costs), and the adapter on its own beside it (`save_adapter`, a small file that
`load_adapter` puts back onto the base weights).

Names are the model's own: a tower is a top-level child of `MMQAModel` (`image_encoder`,
`text_encoder`, `fusion`, `decoder`, ...); `target` must match a module's whole dotted name
(`re.fullmatch`), e.g. `text_encoder\\..*\\.(query|key|value)`. Every tower holding a target has its
own weights frozen: only its adapters train there, while the other towers train as usual (peft's
own injection freezes the whole model it is given, so it is given one tower at a time).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from mmqa.errors import ConfigError, MMQAError

ADAPTER = "adapter.safetensors"  # in a bundle trained with LoRA
LORA_KEYS = ("r", "alpha", "dropout", "target")  # what the adapter file's metadata records


def check_towers(model: nn.Module, names, key: str) -> None:
    """Refuse a name under config `key` (`freeze`, `lr_scale`) that is not a top-level child of `model`."""
    towers = [n for n, _ in model.named_children()]
    for name in names:
        if name not in towers:
            raise ConfigError(f"{key}: {name!r} is not a tower of the model; towers: {', '.join(towers)}")


def freeze(model: nn.Module, towers: list[str]) -> None:
    """Keep the weights of each named tower as loaded (`freeze=[text_encoder]`)."""
    check_towers(model, towers, "freeze")
    for tower in towers:
        model.get_submodule(tower).requires_grad_(False)


def add_lora(model: nn.Module, r: int, alpha: float, dropout: float, target: str) -> list[str]:
    """Put a rank-`r` adapter (scale alpha / r) on every linear layer whose name matches `target`,
    freeze the weights of the towers holding them, and return the adapted layers' names."""
    if r < 1:
        raise ConfigError(f"lora.r must be >= 1 to add adapters (0: no LoRA), got {r}")
    try:
        pattern = re.compile(target)
    except re.error as e:
        raise ConfigError(f"lora.target={target!r} is not a regular expression: {e}") from None
    names = [n for n, m in model.named_modules() if pattern.fullmatch(n)]
    linear = [n for n in names if isinstance(model.get_submodule(n), (nn.Linear, Conv1D))]
    if not linear:
        found = f"it matches {names[:3]}, which are not linear layers" if names else "it matches no module"
        example = next(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
        raise ConfigError(f"lora.target={target!r}: {found} of the model (names are matched whole, "
                          f"e.g. {example!r})")
    by_tower: dict[str, list[str]] = {}
    for name in linear:
        tower, rest = name.split(".", 1) if "." in name else (name, "")
        if not rest:
            raise ConfigError(f"lora.target={target!r} matches the whole tower {tower!r}; name layers inside it")
        by_tower.setdefault(tower, []).append(rest)
    for tower, layers in by_tower.items():
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=layers)
        inject_adapter_in_model(config, model.get_submodule(tower))  # freezes the tower but its adapters
    return linear


def adapt(model: nn.Module, cfg: DictConfig) -> None:
    """Apply a training config's `freeze` and `lora` sections to a freshly built model, and cache a
    frozen text encoder's outputs (`text_cache` rows) when no adapter trains inside it."""
    freeze(model, list(cfg.get("freeze") or []))
    lora = cfg.get("lora")
    if lora and lora.r > 0:
        add_lora(model, lora.r, lora.alpha, lora.dropout, lora.target)
    model.cache_text_if_frozen(cfg.get("text_cache", 0))


def adapter_state(model: nn.Module) -> dict:
    """The adapter weights alone, named as in the model ({} without LoRA)."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if ".lora_" in n}


def merged(model: nn.Module) -> nn.Module:
    """A copy of `model` with every adapter folded into its base weight (W + B A * alpha / r) and each
    LoRA layer replaced by that plain layer: the model's structure and cost without LoRA."""
    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            out.set_submodule(name, module.get_base_layer())
    return out


def save_adapter(state: dict, lora: DictConfig, path: Path) -> None:
    """Write adapter weights (`adapter_state`) with the settings that rebuild them (safetensors metadata)."""
    meta = {"lora": json.dumps({k: OmegaConf.select(lora, k) for k in LORA_KEYS})}
    save_file(state, str(path), metadata=meta)


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """`model` (the base weights) with the adapter file at `path` added and merged."""
    with safe_open(str(path), framework="pt") as f:
        settings = json.loads((f.metadata() or {}).get("lora", "null") or "null")
        if not settings:
            raise MMQAError(f"{path}: not an mmqa LoRA adapter (no 'lora' settings in its metadata)")
        add_lora(model, settings["r"], settings["alpha"], settings["dropout"], settings["target"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    missing = set(adapter_state(model)) ^ set(state)
    if missing:
        raise MMQAError(f"{path}: its adapter weights do not fit this model ({sorted(missing)[:3]} ...)")
    model.load_state_dict(state, strict=False)
    return merged(model)
