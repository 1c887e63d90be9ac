"""Every option of every config group composes, and what it configures can be built: a typo in any
YAML file fails here, not in somebody's sweep."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONF, ROOT

GROUPS = {
    str(p.parent.relative_to(CONF)): sorted(x.stem for x in p.parent.glob("*.yaml"))
    for p in CONF.glob("**/*.yaml")
    if p.parent != CONF and p.parent.name != "hydra" and "reader" not in p.parent.parts
}
OPTIONS = [(g, o) for g, opts in sorted(GROUPS.items()) for o in opts]
PATHS = [f"paths.data_dir={ROOT}/data", "paths.output_dir=/tmp/out", f"paths.root_dir={ROOT}"]
NEEDS_ROOT = {"jsonl", "vqav2", "coco_captions", "recipe1m"}


def compose_option(group: str, option: str):
    extra = ["data.root=/some/dataset"] if group == "data" and option in NEEDS_ROOT else []
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"{group}={option}", *extra, *PATHS])


def test_groups_found():
    assert {"data", "model", "model/fusion", "model/image_encoder", "model/text_encoder", "model/decoder",
            "trainer", "logger", "callbacks", "paths"} <= set(GROUPS)


@pytest.mark.parametrize("group,option", OPTIONS)
def test_every_option_composes_and_resolves(group, option):
    cfg = compose_option(group, option)
    OmegaConf.resolve(cfg)  # every interpolation points somewhere
    if group.startswith("model/"):
        assert "_target_" in cfg.model[group.split("/")[1]]


@pytest.mark.parametrize("option", GROUPS["trainer"])
def test_trainer_options_build_a_trainer(option):
    cfg = compose_option("trainer", option)
    if cfg.trainer.accelerator == "gpu":
        pytest.skip("needs a CUDA device")
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("option", GROUPS["data"])
def test_data_options_build_their_reader(option):
    cfg = compose_option("data", option)
    dm = instantiate(cfg.data)
    assert type(dm.reader).__name__ == cfg.data.reader._target_.rsplit(".", 1)[1]


def test_data_options_that_need_a_root_say_so():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["data=jsonl", *PATHS])
    with pytest.raises(Exception, match=r"Missing mandatory value: data\.(reader\.)?root"):
        instantiate(cfg.data)


def test_unknown_fusion_lists_the_valid_choices():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        with pytest.raises(Exception, match=r"(?s)Could not find 'model/fusion/mid'.*Available options.*cross.*early.*late"):
            compose("train", overrides=["model/fusion=mid", *PATHS])
