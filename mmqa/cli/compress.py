"""Make a bundle cheaper (conf/compress.yaml; the methods are mmqa/compress/):

    python -m mmqa compress bundle=<run>/bundle method=int8                     # -> <run>/bundle-int8
    python -m mmqa compress bundle=<run>/bundle method=prune prune.heads=0.4 prune.ffn=0.4 finetune.epochs=3

The result is an ordinary bundle (safetensors and YAML) that `Bundle.load`, evaluate and the demo take
like any other. Pruning ranks heads by their gradient importance on the val split, neurons by weight
magnitude, removes them, then fine-tunes on the train split. Prints the sizes before and after."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from mmqa.build import build_lit_module, data_for_bundle, first_batches
from mmqa.bundle import WEIGHTS, Bundle
from mmqa.compress import check_method, record, steps_of
from mmqa.compress.int8 import quantize_int8
from mmqa.compress.prune import prune, rank_heads, rank_neurons
from mmqa.errors import ConfigError
from mmqa.inspect.capture import STACKS, attention_modules, attention_site, stack_of
from mmqa.inspect.heads import importance
from mmqa.train import fill_text_cache

CONF = Path(__file__).resolve().parents[2] / "conf"


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def int8(cfg: DictConfig, bundle: Bundle) -> dict:
    return {"kernel": cfg.int8.kernel, "linear_layers": quantize_int8(bundle.model, cfg.int8.kernel)}


def pruned(cfg: DictConfig, bundle: Bundle) -> dict:
    for key in ("heads", "ffn"):
        if not 0 <= cfg.prune[key] < 1:
            raise ConfigError(f"prune.{key}={cfg.prune[key]}: a share of the model to remove, in [0, 1)")
    stacks = [cfg.prune.stacks] if isinstance(cfg.prune.stacks, str) else list(cfg.prune.stacks)
    if not stacks or set(stacks) - set(STACKS.values()):
        raise ConfigError(f"prune.stacks={stacks}: name one or more of {', '.join(STACKS.values())}")
    model, before = bundle.model, parameters(bundle.model)
    lit, batches = first_batches(cfg.data.copy(), bundle, "val", cfg.prune.n)
    sites = {attention_site(n, m): n for n, m in attention_modules(model)}
    ranked = importance(lit, batches)  # {site: (h,)}
    scores = {sites[s]: v for s, v in ranked.items() if stack_of(sites[s]) in stacks}  # {path: (h,)}
    keep = rank_heads(scores, {p: stack_of(p) for p in scores}, cfg.prune.heads)
    neurons = {p: k for p, k in rank_neurons(model, cfg.prune.ffn).items() if stack_of(p) in stacks}
    sizes = prune(model, keep, neurons)
    if cfg.finetune.epochs:
        run_cfg = bundle.cfg.copy()
        with open_dict(run_cfg):
            run_cfg.optim.lr = cfg.finetune.lr
        train_dm = data_for_bundle(cfg.data.copy(), bundle, "train")
        lit = build_lit_module(run_cfg, model, train_dm, split="val", train=True)
        # a frozen tower (the pretrained MiniLM) is pruned but not retrained: encode each text once
        if model.cache_text_if_frozen(run_cfg.get("text_cache", 0)) and run_cfg.get("text_cache_fill", 0) > 0:
            fill_text_cache(model, train_dm, run_cfg.text_cache_fill)
        trainer = instantiate(cfg.trainer, max_epochs=cfg.finetune.epochs, logger=False, enable_checkpointing=False)
        try:
            trainer.fit(lit, datamodule=train_dm)
        finally:
            model.text_cache = None  # training-time state: the pruned bundle encodes afresh
        model.eval()
    return {"heads": cfg.prune.heads, "ffn": cfg.prune.ffn, "stacks": stacks,
            "finetune_epochs": cfg.finetune.epochs, "parameters_before": before, "parameters": parameters(model),
            "sizes": sizes}


METHODS = {"int8": int8, "prune": pruned}  # what each method does to a loaded bundle; returns its record


def compress_bundle(cfg: DictConfig) -> Path:
    src = Path(cfg.bundle)
    out = Path(cfg.out) if cfg.out else src.with_name(f"{src.name}-{cfg.method}")
    if out.resolve() == src.resolve():
        raise ConfigError(f"out={out}: the compressed bundle would overwrite the one it is made from")
    bundle = Bundle.load(src)
    check_method(bundle.cfg, cfg.method)
    step = record(cfg.method, {}, METHODS[cfg.method](cfg, bundle))
    new_cfg = bundle.cfg.copy()
    with open_dict(new_cfg):
        new_cfg.compression = [*[OmegaConf.to_container(s) for s in steps_of(bundle.cfg)], step]
    Bundle(new_cfg, bundle.model, bundle.text_tokenizer, bundle.decoder_tokenizer, bundle.answers,
           bundle.ingredients).save(out)
    before, after = (src / WEIGHTS).stat().st_size, (out / WEIGHTS).stat().st_size
    print(f"{cfg.method}: {({k: v for k, v in step.items() if k != 'sizes'})} -> {out}")
    print(f"{WEIGHTS}: {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB ({before / after:.2f}x smaller)")
    return out


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="compress")
def main(cfg: DictConfig) -> None:
    compress_bundle(cfg)


if __name__ == "__main__":
    main()
