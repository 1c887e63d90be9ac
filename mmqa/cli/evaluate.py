"""Evaluate any bundle on any dataset split:
`python -m mmqa evaluate bundle=outputs/.../bundle data=jsonl data.root=... split=test`.
The LightningModule is built by `mmqa.build.build_lit_module` from the bundle's stored config, as
in training.

Prints the metrics and writes them to `<run>/metrics.json` under the same keys as training."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from mmqa.atomic import write_json
from mmqa.build import build_lit_module, data_for_bundle, test_split
from mmqa.bundle import Bundle
from mmqa.data.datamodule import SPLITS
from mmqa.errors import ConfigError

CONF = Path(__file__).resolve().parents[2] / "conf"  # the project's config tree (an editable install)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    if cfg.split not in SPLITS:  # before loading the bundle
        raise ConfigError(f"split={cfg.split!r} is not a split; valid: {', '.join(SPLITS)}")
    bundle = Bundle.load(cfg.bundle)
    dm = data_for_bundle(cfg.data, bundle, cfg.split)
    records = dm.load_records()[cfg.split]
    # the bundle's own settings, with this command's: every image captioned, recipe thresholds if given
    run_cfg = bundle.cfg.copy()
    with open_dict(run_cfg):
        run_cfg.eval = {"max_caption_eval_images": len(records)}
        run_cfg.recipe = {**(run_cfg.get("recipe") or {}),
                          **{k: v for k, v in (cfg.get("recipe") or {}).items() if v is not None}}
    lit = build_lit_module(run_cfg, bundle.model, dm, split=cfg.split, train=False)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    metrics = test_split(trainer, lit, dm, cfg.split)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
