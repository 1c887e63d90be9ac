"""Making a trained model cheaper. A compressed bundle is an ordinary bundle whose `config.yaml`
lists, under `compression`, the steps applied to it in order (`{method: int8, ...}`, `{method:
prune, sizes: ...}`); `Bundle.load` builds the model from the config, replays each step's change of
structure (`restructure`) and only then loads the weights, so the safetensors file holds the
compressed tensors themselves and no code.

`REPLAY` is the one registry: method name -> how its structure is rebuilt from its record (int8:
mmqa/compress/int8.py; prune: mmqa/compress/prune.py). The CLI (mmqa/cli/compress.py) applies them.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from mmqa.compress.int8 import quantize_int8
from mmqa.compress.prune import resize
from mmqa.errors import MMQAError

FORMAT = 1  # the version of a step's record; a newer bundle read by an older mmqa is refused by name

# method -> fn(model, step record): the step's structure, without its weights
REPLAY = {
    "int8": lambda model, step: quantize_int8(model, step.get("kernel", "auto"), empty=True),
    "prune": lambda model, step: resize(model, OmegaConf.to_container(step.sizes)),
}


def steps_of(cfg: DictConfig) -> list[DictConfig]:
    steps = cfg.get("compression") or []
    return list(steps) if isinstance(steps, (list, ListConfig)) else [steps]


def restructure(model: nn.Module, cfg: DictConfig, path: Path) -> None:
    """Replay the structure of every compression step of a bundle's config onto a freshly built
    model, so that the bundle's weights fit it. `path` names the bundle in errors."""
    for i, step in enumerate(steps_of(cfg)):
        method = step.get("method")
        if method not in REPLAY or step.get("format", FORMAT) > FORMAT:
            raise MMQAError(
                f"{path / 'config.yaml'}: compression[{i}] is method={method!r} (format {step.get('format')}), "
                f"which this mmqa cannot run; it runs {', '.join(REPLAY)} up to format {FORMAT}"
            )
        REPLAY[method](model, step)


def check_method(cfg: DictConfig, method: str) -> None:
    """Refuse what cannot be done to a bundle with config `cfg` before any work starts."""
    if method not in REPLAY:
        raise MMQAError(f"method={method!r} is not a compression method; valid: {', '.join(REPLAY)}")
    done = [s.get("method") for s in steps_of(cfg)]
    if method in done:
        raise MMQAError(f"this bundle is already compressed with {method} (config.yaml: compression = {done}); "
                        "compress the bundle it was made from instead")
    if "int8" in done:
        raise MMQAError(f"this bundle is int8-quantized (config.yaml: compression = {done}): {method} needs the "
                        "float weights; compress the bundle it was made from, then quantize")


def record(method: str, options: dict, result: dict) -> dict:
    """The step appended to a bundle's `compression` list."""
    return {"method": method, "format": FORMAT, **options, **result}
