"""Shared fixtures: tiny configs composed through Hydra (the real config tree, shrunk), a tiny shapes
dataset generated once per session, and a tiny model with one real batch."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may touch the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import mmqa.config_check  # noqa: F401 - registers the config schema that conf/train.yaml names

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# The real default config with every size shrunk (conf/debug/tiny.yaml): a training run takes seconds.
TINY = ["debug=tiny"]
TINY_DATA = ["debug=tiny_data"]  # the data part alone, for conf/evaluate.yaml
NORMALIZATION = ([0.5] * 3, [0.25] * 3)  # (mean, std) for data modules built by hand


def read_lines(path: Path) -> list[dict]:
    """A JSONL file's rows."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def compose_cfg(data_dir: Path, out_dir: Path, overrides=(), config_name: str = "train"):
    """The composed config as train.py (or `python -m mmqa evaluate`, which has no model keys) would see
    it, with paths pointed at temporary folders."""
    tiny = TINY if config_name == "train" else TINY_DATA
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose(config_name, overrides=[*tiny, *overrides, *path_overrides(data_dir, out_dir)])


def path_overrides(data_dir: Path, out_dir: Path) -> list[str]:
    return [f"paths.data_dir={data_dir}", f"paths.output_dir={out_dir}", f"paths.root_dir={ROOT}"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One tiny shapes dataset shared by the whole session (generated on first use, then cached)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def tiny_cfg(data_dir, tmp_path):
    def make(*overrides, config_name="train"):
        return compose_cfg(data_dir, tmp_path / "run", overrides, config_name)

    return make


@pytest.fixture
def tiny_parts(tiny_cfg):
    """(cfg, datamodule, model, LitMMQA, one training batch) for the default tiny config."""
    from mmqa.build import build_experiment

    def make(*overrides):
        cfg = tiny_cfg(*overrides)
        dm, lit = build_experiment(cfg)
        model = lit.model
        batch = next(iter(dm.loader("train", train=False)))
        return cfg, dm, model, lit, batch

    return make
