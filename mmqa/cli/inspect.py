"""Look inside a bundle: `python -m mmqa inspect bundle=<run>/bundle [task=example|faithfulness] ...`
(conf/inspect.yaml). One report folder per call (outputs/inspect/runs/<date_time>): report.md, PNGs
and a CSV of every number shown (mmqa/inspect/report.py).

- task=example image=... question=...: every attention map of one question, and the caption's
  cross-attention word by word (mmqa/inspect/maps.py);
- task=faithfulness data=... split=test n=300: deletion / insertion AUC of each map over n questions
  of a split (mmqa/inspect/faithfulness.py);
- task=heads: the importance of every head and the accuracy as each stack's heads are masked, least
  important first (mmqa/inspect/heads.py);
- task=lens: VQA accuracy per fusion layer and question family, and next-token accuracy and loss per
  decoder layer (mmqa/inspect/lens.py);
- task=compare bundle_b=...: two checkpoints of one model on the same batches (mmqa/inspect/compare.py);
- task=patching pairs=100: activation patching on pairs of shapes scenes that differ in one object's
  colour (mmqa/inspect/patching.py).
"""

from __future__ import annotations

import sys
from itertools import islice
from pathlib import Path

import hydra
from omegaconf import DictConfig

from mmqa.build import build_lit_module, data_for_bundle, first_batches
from mmqa.bundle import Bundle
from mmqa.data.images import load_image
from mmqa.errors import ConfigError
from mmqa.inspect import compare, faithfulness, heads, lens, patching, report
from mmqa.inspect.maps import METHODS, caption_maps, explain

CONF = Path(__file__).resolve().parents[2] / "conf"
TASKS = ("example", "faithfulness", "heads", "lens", "compare", "patching")


def _questions(cfg: DictConfig, bundle: Bundle):
    records = data_for_bundle(cfg.data, bundle, cfg.split).load_records()[cfg.split]
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
                                     cfg.question, caption_maps(bundle, image))
    elif cfg.task == "heads":
        lit, batches = first_batches(cfg.data, bundle, cfg.split, cfg.n)
        scores = heads.importance(lit, batches)
        curve = heads.pruning_curve(lit, batches, scores, list(cfg.fractions))
        files = report.heads_files(scores, curve, _command())
    elif cfg.task == "compare":
        if not cfg.bundle_b:
            raise ConfigError("task=compare needs bundle_b=<the second bundle>")
        other = Bundle.load(cfg.bundle_b)
        compare.check_comparable(bundle, other)
        lit, batches = first_batches(cfg.data, bundle, cfg.split, cfg.n)
        lit_b = build_lit_module(other.cfg, other.model, data_for_bundle(cfg.data, other, cfg.split), split=cfg.split,
                                 train=False)
        files = report.compare_files(compare.compare(lit, lit_b, batches, bundle.text_tokenizer), _command())
    elif cfg.task == "lens":
        lit, batches = first_batches(cfg.data, bundle, cfg.split, cfg.n)
        files = report.lens_files(lens.logit_lens(lit, batches), lens.decoder_lens(lit, batches), _command())
    elif cfg.task == "patching":
        if cfg.pairs < 1:
            raise ConfigError(f"task=patching needs pairs >= 1; got pairs={cfg.pairs}")
        pairs = patching.world_pairs(data_for_bundle(cfg.data, bundle, cfg.split), cfg.split, cfg.pairs, cfg.seed)
        files = report.patching_files(*patching.evaluate(bundle, pairs), _command())
    else:
        if cfg.steps < 1 or cfg.n < 1:
            raise ConfigError(f"task=faithfulness needs steps >= 1 and n >= 1; got steps={cfg.steps}, n={cfg.n}")
        rows, curves = faithfulness.evaluate(bundle, _questions(cfg, bundle), list(cfg.methods), cfg.steps, cfg.seed)
        files = report.faithfulness_files(rows, faithfulness.summarise(rows), curves, _command())
    written = report.write(out, files)
    print(out / "report.md")
    return written


def _command() -> str:
    return "python -m mmqa inspect " + " ".join(sys.argv[1:])


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="inspect")
def main(cfg: DictConfig) -> None:
    inspect(cfg)


if __name__ == "__main__":
    main()
