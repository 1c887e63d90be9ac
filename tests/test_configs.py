"""Every option of every config group composes, and what it configures can be built: a typo in any
YAML file fails here, not in somebody's sweep."""

from __future__ import annotations

import pytest
from conftest import CONF, ROOT
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

BASES = {"data": "base"}  # the keys a group's options share, not an option on its own
GROUPS = {
    str(p.parent.relative_to(CONF)): sorted(x.stem for x in p.parent.glob("*.yaml")
                                            if BASES.get(str(p.parent.relative_to(CONF))) != x.stem)
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
            "loss", "optim", "scheduler", "trainer", "logger", "callbacks", "paths", "debug", "experiment"} <= set(GROUPS)


def test_every_dataset_extends_the_base_and_the_base_alone_is_not_a_dataset():
    for option in GROUPS["data"]:
        cfg = compose_option("data", option)
        assert cfg.data.reader._target_.startswith("mmqa.data.readers.")
        assert cfg.data.num_workers == {"shapes": 1, "dishes": 0}.get(option.split("_")[0], 2)  # real data decodes JPEGs in workers
    with pytest.raises(Exception, match=r"Missing mandatory value: data\.reader"):
        instantiate(compose_option("data", "base").data)


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


def test_the_schema_refuses_unknown_keys_and_wrong_types_while_composing(tmp_path):
    """conf/train.yaml starts from the typed schema (mmqa/config_check.py): a misspelt key in a YAML
    file or a value of the wrong type fails in Hydra's composition, naming the key."""
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "experiment" / "typo.yaml").write_text("# @package _global_\nseeed: 3\n")
    with initialize_config_dir(str(conf), version_base="1.3"):
        with pytest.raises(Exception, match=r"(?s)Key 'seeed' not in 'TrainConfig'"):
            compose("train", overrides=["experiment=typo", *PATHS])
        with pytest.raises(Exception, match=r"Error merging override loss\.vqa=abc") as e:
            compose("train", overrides=["loss.vqa=abc", *PATHS])
    assert "Value 'abc' of type 'str' could not be converted to Float" in str(e.value.__cause__)


def test_the_loss_schema_names_every_loss_term():
    from dataclasses import fields

    from mmqa.config_check import Loss
    from mmqa.lit_module import TASKS

    assert tuple(f.name for f in fields(Loss)) == TASKS


@pytest.mark.parametrize("option", [o for o in GROUPS["experiment"] if o.endswith("_ablation")])
def test_ablation_presets_are_sweeps_without_m(option):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={option}", *PATHS], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN" and "seed" in cfg.hydra.sweeper.params
