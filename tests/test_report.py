"""The ablation report (mmqa/report.py) on a synthetic multirun folder with known numbers, and the
sweep presets (conf/experiment/, conf/hparams_search/) composing into the sweeps they promise.
Nothing here trains a model."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest
import yaml
from conftest import CONF, ROOT
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from mmqa.cli.report import Group, Run, build_report, compare, main

PATHS = [f"paths.data_dir={ROOT}/data", "paths.output_dir=/tmp/out", f"paths.root_dir={ROOT}"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Two configurations x three seeds. VQA accuracy differs by far more than its seed spread; the
# attribute family is identical in both; fit_seconds has a known mean and std.
VQA = {"early": [0.50, 0.52, 0.54], "cross": [0.80, 0.82, 0.84]}
ATTRIBUTE = [0.6, 0.7, 0.8]
COUNTING = {"early": [0.30, 0.40, 0.50], "cross": [0.35, 0.45, 0.40]}
FIT_SECONDS = [100.0, 110.0, 120.0]
PARAMETERS = {"early": 1_000_000, "cross": 1_200_000}
# job number -> (fusion, seed, has metrics.json); job 3 (early, seed 3) never ran, job 7 crashed
JOBS = {
    0: ("early", 0, True), 1: ("early", 1, True), 2: ("early", 2, True),
    4: ("cross", 0, True), 5: ("cross", 1, True), 6: ("cross", 2, True),
    7: ("cross", 3, False),
}


def write_run(path, fusion: str, seed: int, ok: bool) -> None:
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "model": {"fusion": fusion}}))
    overrides = ["experiment=fusion_ablation", f"model/fusion={fusion}", f"seed={seed}"]
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    curve = path / "csv" / "version_0"
    curve.mkdir(parents=True)
    base = VQA[fusion][seed % 3]
    rows = ["epoch,step,train/loss,val/vqa_acc"]
    for epoch in range(3):  # a training row (no validation value), then the epoch's validation row
        rows += [f"{epoch},{epoch * 10 + 5},2.0,", f"{epoch},{epoch * 10 + 9},,{base - 0.1 * (2 - epoch):.3f}"]
    (curve / "metrics.csv").write_text("\n".join(rows) + "\n")
    if not ok:
        return
    i = seed % 3
    metrics = {
        "test/vqa_acc": VQA[fusion][i],
        "test/vqa_acc/attribute": ATTRIBUTE[i],
        "test/vqa_acc/counting": COUNTING[fusion][i],
        "test/bleu4": 0.2, "test/cider": 0.5, "test/r1_t2i": 0.3, "test/r1_i2t": 0.31,
        "model/parameters": PARAMETERS[fusion],
        "train/images_per_second": 40.0,
        "train/fit_seconds": FIT_SECONDS[i],
        "val/vqa_acc": VQA[fusion][i] + 0.01,
    }
    (path / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def sweep(tmp_path):
    d = tmp_path / "multirun" / "fusion_ablation" / "2026-01-01_00-00-00"
    for job, (fusion, seed, ok) in JOBS.items():
        write_run(d / str(job), fusion, seed, ok)
    return d


def run_cli(*dirs) -> None:
    assert main([str(d) for d in dirs]) == 0


def test_table_means_stds_and_seed_counts(sweep):
    rep = build_report([sweep], alpha=0.05)
    early, cross = rep.groups
    assert (early.label, cross.label) == ("model/fusion=early", "model/fusion=cross")  # seed is not a configuration
    assert [len(g.succeeded) for g in rep.groups] == [3, 3]
    acc = early.stat("test/vqa_acc")
    assert (acc.mean, acc.std, acc.n) == (pytest.approx(0.52), pytest.approx(0.02), 3)
    assert cross.stat("test/vqa_acc").mean == pytest.approx(0.82)
    fit = cross.stat("train/fit_seconds")
    assert (fit.mean, fit.std) == (pytest.approx(110.0), pytest.approx(10.0))
    assert rep.metrics[:3] == ["test/vqa_acc", "test/vqa_acc/attribute", "test/vqa_acc/counting"]

    run_cli(sweep)
    md = (sweep / "report.md").read_text()
    assert "| C1 | model/fusion=early | 3 | 0 | 0.520 ± 0.020 |" in md
    assert "| C2 | model/fusion=cross | 3 | 1 | 0.820 ± 0.020 |" in md
    assert "110.0 ± 10.0" in md and "1,200,000" in md


def test_failed_and_missing_runs_are_listed_by_name(sweep):
    run_cli(sweep)
    md = (sweep / "report.md").read_text()
    assert "6 succeeded, 1 failed, 1 missing" in md
    assert f"failed (no metrics.json; crashed or still running): `{sweep}/7` (experiment=fusion_ablation model/fusion=cross seed=3)" in md
    assert f"missing (no run folder): `{sweep}/3`" in md


def test_missing_jobs_come_from_multirun_yaml_when_present(sweep):
    # the sweep as Hydra's BasicSweeper saves it: 2 fusions x 4 seeds = 8 jobs, job 3 = (early, seed 3)
    hydra = {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                         "max_batch_size": None, "params": {"model/fusion": "early,cross", "seed": "0,1,2,3"}},
             "overrides": {"hydra": [], "task": ["experiment=fusion_ablation"]}}
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra, "seed": 0}))
    rep = build_report([sweep], alpha=0.05)
    assert rep.missing == [f"{sweep}/3 (model/fusion=early seed=3 experiment=fusion_ablation)"]
    assert not rep.notes

    # a sweep that needs the config tree to expand (a glob over options) falls back to gaps in 0..max
    hydra["sweeper"]["params"]["model/fusion"] = "glob(*)"
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra}))
    rep = build_report([sweep], alpha=0.05)
    assert rep.missing == [f"{sweep}/3"]
    assert len(rep.notes) == 1 and "multirun.yaml: sweep not expanded" in rep.notes[0]


def test_welch_verdicts(sweep):
    rep = build_report([sweep], alpha=0.05)
    verdict = {c.metric: c for c in rep.comparisons}
    assert set(verdict) == {"test/vqa_acc", "test/vqa_acc/attribute", "test/vqa_acc/counting"}
    assert verdict["test/vqa_acc"].verdict == "significant" and verdict["test/vqa_acc"].p < 1e-3
    assert verdict["test/vqa_acc/attribute"].verdict == "not significant"
    assert verdict["test/vqa_acc/attribute"].p == pytest.approx(1.0)

    run_cli(sweep)
    md = (sweep / "report.md").read_text()
    acc_section = md.split("### test/vqa_acc\n")[1].split("###")[0]
    assert "| C1 | C2 | 0.520 | 0.820 | +0.300 |" in acc_section and "| significant |" in acc_section
    assert "Beyond the seed spread: C2 > C1." in acc_section
    attr_section = md.split("### test/vqa_acc/attribute\n")[1].split("###")[0]
    assert "not significant" in attr_section and "No difference exceeds the seed spread." in attr_section


def test_one_seed_is_not_tested(tmp_path):
    def group(name, values):
        runs = [Run(f"r{i}", tmp_path, i, {}, {"test/vqa_acc": v}) for i, v in enumerate(values)]
        return Group(name, name, {}, runs)

    assert compare("test/vqa_acc", group("a", [0.5]), group("b", [0.8, 0.9]), 0.05).verdict == "n/a (1 seed)"
    assert compare("test/vqa_acc", group("a", [0.5, 0.5]), group("b", [0.8, 0.8]), 0.05).verdict == "n/a (no seed spread)"


def test_csv_has_one_row_per_configuration(sweep):
    run_cli(sweep)
    with (sweep / "report.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["id"], r["model/fusion"], r["seeds"], r["failed"]) for r in rows] == [
        ("C1", "early", "3", "0"), ("C2", "cross", "3", "1")]
    assert float(rows[0]["test/vqa_acc mean"]) == pytest.approx(0.52)
    assert float(rows[0]["test/vqa_acc std"]) == pytest.approx(0.02)
    assert rows[0]["test/vqa_acc n"] == "3"
    assert float(rows[1]["model/parameters mean"]) == 1_200_000
    assert float(rows[1]["train/fit_seconds std"]) == pytest.approx(10.0)


def test_figures_are_real_pngs_and_writes_leave_no_temp_files(sweep):
    run_cli(sweep)
    for name in ("per_family.png", "val_curves.png"):
        data = (sweep / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, name
    assert not list(sweep.glob(".*.tmp"))


def test_several_dirs_pool_their_runs(sweep, tmp_path):
    more = tmp_path / "more"
    write_run(more / "0", "early", 3, True)
    rep = build_report([sweep, more], alpha=0.05)
    assert [len(g.succeeded) for g in rep.groups] == [4, 3]
    assert rep.missing == [f"{sweep}/3"]


def test_a_dir_without_runs_is_an_error(tmp_path):
    empty = tmp_path / "empty_sweep"
    (empty / "0").mkdir(parents=True)  # a folder, but no .hydra/config.yaml
    proc = subprocess.run([sys.executable, "-m", "mmqa", "report", str(empty)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"{empty}: no runs found" in proc.stderr
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "nowhere")])
    assert e.value.code == 2


# ----------------------------------------------------------------------------- sweep presets
def compose_hydra(*overrides, hydra: bool = True):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=[*overrides, *PATHS], return_hydra_config=hydra)


def sweep_jobs(cfg) -> list[list[str]]:
    """The jobs the BasicSweeper would launch from a preset's `hydra.sweeper.params`."""
    params = [f"{k}={v}" for k, v in OmegaConf.to_container(cfg.hydra.sweeper.params).items()]
    return BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)[0]


EXPECTED_SWEEPS = {
    "fusion_ablation": {"model/fusion": {"early", "late", "cross"}},
    "loss_ablation": {"loss": {"vqa", "vqa_contrastive", "vqa_caption", "vqa_caption_contrastive", "all"}},
    "depth_ablation": {"model.fusion.depth": {"1", "2", "4"}},
    "attention_ablation": {"model/attention": {"sdpa", "eager", "sliding_window", "linear", "tiled"},
                           "data.image_size": {"64", "128"}},
    "collapse_study": {"stability": {"none", "qk_norm", "sigma_reparam", "registers"}},
    "relation_ablation": {"model/fusion": {"cross", "relation", "anchored"}},
}


SINGLE_RUNS = {"recipes", "distill"}  # presets that set up one task rather than a sweep (tests/test_recipes.py, tests/test_distill.py)


def test_every_experiment_preset_is_tested():
    assert {p.stem for p in (CONF / "experiment").glob("*.yaml")} == set(EXPECTED_SWEEPS) | SINGLE_RUNS


@pytest.mark.parametrize("name", sorted(EXPECTED_SWEEPS))
def test_experiment_sweeps_compose(name):
    OmegaConf.resolve(compose_hydra(f"experiment={name}", hydra=False))  # every interpolation resolves
    cfg = compose_hydra(f"experiment={name}")
    assert cfg.task_name == name
    default = compose_hydra(hydra=False)
    budget = cfg.trainer.max_epochs * cfg.data.reader.n_train
    assert budget < default.trainer.max_epochs * default.data.reader.n_train  # a reduced budget
    jobs = sweep_jobs(cfg)
    values = {}
    for job in jobs:
        for o in job:
            k, v = o.split("=", 1)
            values.setdefault(k, set()).add(v)
    assert values == {**EXPECTED_SWEEPS[name], "seed": {"0", "1", "2"}}
    assert len(jobs) == 3 * math.prod(len(v) for v in EXPECTED_SWEEPS[name].values())
    for job in jobs:  # every job of the sweep composes
        job_cfg = compose_hydra(f"experiment={name}", *job)
        assert job_cfg.seed == int(dict(o.split("=", 1) for o in job)["seed"])


def test_fusion_ablation_is_nine_runs():
    assert len(sweep_jobs(compose_hydra("experiment=fusion_ablation"))) == 9


def test_loss_presets_keep_the_default_weights():
    weights = {name: dict(compose_hydra(f"loss={name}").loss) for name in EXPECTED_SWEEPS["loss_ablation"]["loss"]}
    assert weights["all"] == {"vqa": 1.0, "caption": 1.0, "contrastive": 0.5, "concepts": 2.0, "ingredients": 1.0,
                              "recipe": 1.0}
    assert dict(compose_hydra().loss) == weights["all"]
    off = {"concepts": 0.0, "ingredients": 0.0, "recipe": 0.0}
    assert weights["vqa"] == {"vqa": 1.0, "caption": 0.0, "contrastive": 0.0, **off}
    assert weights["vqa_contrastive"] == {"vqa": 1.0, "caption": 0.0, "contrastive": 0.5, **off}
    assert weights["vqa_caption"] == {"vqa": 1.0, "caption": 1.0, "contrastive": 0.0, **off}
    # the three tasks as in `all`, without the concept loss: the one term the two rows differ in
    assert weights["vqa_caption_contrastive"] == {**weights["all"], "concepts": 0.0}


def test_optuna_search_composes_into_a_search_space():
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    OmegaConf.resolve(compose_hydra("hparams_search=optuna", hydra=False))
    cfg = compose_hydra("hparams_search=optuna")
    s = cfg.hydra.sweeper
    assert s._target_.endswith("OptunaSweeper") and s.direction == "maximize" and s.n_trials == 20
    assert cfg.optimized_metric == "val/vqa_acc" and s.sampler._target_ == "optuna.samplers.TPESampler"
    space, fixed = create_params_from_overrides([f"{k}={v}" for k, v in OmegaConf.to_container(s.params).items()])
    assert not fixed
    assert type(space["optim.lr"]).__name__ == "LogUniformDistribution"
    assert space["model.fusion.depth"].choices == (1, 2, 4)
    assert set(space) == {"optim.lr", "model.fusion.depth", "loss.caption", "loss.contrastive"}
