"""Look inside a bundle: `python -m mmqa inspect bundle=<run>/bundle [task=example|faithfulness] ...`
(conf/inspect.yaml). One report folder per call (outputs/inspect/runs/<date_time>): report.md, PNGs
and a CSV of every number shown (mmqa/inspect/report.py).

- task=example image=... question=...: every attention map of one question (mmqa/inspect/maps.py);
- task=faithfulness data=... split=test n=300: deletion / insertion AUC of each map over n questions
  of a split (mmqa/inspect/faithfulness.py).
"""

from __future__ import annotations

import sys
from itertools import islice
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from mmqa.bundle import Bundle
from mmqa.data.datamodule import SPLITS
from mmqa.data.images import load_image
from mmqa.errors import ConfigError
from mmqa.inspect import faithfulness, report
from mmqa.inspect.maps import METHODS, explain

CONF = Path(__file__).resolve().parents[2] / "conf"
TASKS = ("example", "faithfulness")


def _questions(cfg: DictConfig, bundle: Bundle):
    if cfg.split not in SPLITS:
        raise ConfigError(f"split={cfg.split!r} is not a split; valid: {', '.join(SPLITS)}")
    dm = instantiate(cfg.data)
    records = dm.load_records()[cfg.split]
    if not records:
        raise ConfigError(f"split={cfg.split!r}: the dataset has no {cfg.split} split")
    return islice(((r.image, qa.question) for r in records for qa in r.questions), cfg.n)


def inspect(cfg: DictConfig) -> list[Path]:
    if cfg.task not in TASKS:
        raise ConfigError(f"task={cfg.task!r}; valid: {', '.join(TASKS)}")
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"methods: unknown {unknown}; valid: {', '.join(METHODS)}")
    bundle = Bundle.load(cfg.bundle)
    out = Path(cfg.paths.output_dir)
    if cfg.task == "example":
        if not cfg.image or not cfg.question:
            raise ConfigError("task=example needs image=<file> and question=\"...\"")
        image = load_image(cfg.image)
        files = report.example_files(explain(bundle, image, cfg.question), image.resize((bundle.cfg.data.image_size,) * 2),
                                     cfg.question)
    else:
        if cfg.steps < 1 or cfg.n < 1:
            raise ConfigError(f"task=faithfulness needs steps >= 1 and n >= 1; got steps={cfg.steps}, n={cfg.n}")
        rows, curves = faithfulness.evaluate(bundle, _questions(cfg, bundle), list(cfg.methods), cfg.steps, cfg.seed)
        command = "python -m mmqa inspect " + " ".join(sys.argv[1:])
        files = report.faithfulness_files(rows, faithfulness.summarise(rows), curves, command)
    written = report.write(out, files)
    print(out / "report.md")
    return written


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="inspect")
def main(cfg: DictConfig) -> None:
    inspect(cfg)


if __name__ == "__main__":
    main()
