"""End to end through the real entry points on a tiny config: `train.py` for every fusion variant
(files written, metric keys), the bundle round trip, `ckpt_path=last`, and `python -m mmqa evaluate`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, TINY_DATA, compose_cfg
from PIL import Image

from mmqa.bundle import Bundle
from mmqa.data.worlds.shapes import DEFAULT_FAMILIES
from mmqa.errors import ConfigError
from mmqa.train import train

VARIANTS = sorted(p.stem for p in (ROOT / "conf" / "model" / "fusion").glob("*.yaml"))
STABLE_KEYS = ["test/vqa_acc", "test_paraphrase/vqa_acc", "test/bleu4", "test/cider", "test/r1_t2i", "test/r1_i2t", "val/vqa_acc",
               "train/images_per_second", "train/step_seconds", "model/parameters", "model/gflops_per_image"]


def run(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """One in-process training run shared by the bundle and evaluate tests."""
    out = tmp_path_factory.mktemp("runs") / "first"
    cfg = compose_cfg(data_dir, out)
    return cfg, train(cfg), out


def test_train_py_writes_checkpoints_metrics_and_bundle_for_every_fusion(data_dir, tmp_path):
    """One Hydra multirun, one job a fusion variant (one start-up for all of them)."""
    sweep = tmp_path / "sweep"
    run(["train.py", "-m", *TINY, f"model/fusion={','.join(VARIANTS)}", f"paths.data_dir={data_dir}",
         f"hydra.sweep.dir={sweep}"])
    for i, fusion in enumerate(VARIANTS):
        out = sweep / str(i)
        assert f"model/fusion={fusion}" in (out / ".hydra" / "overrides.yaml").read_text()
        assert (out / "checkpoints" / "last.ckpt").is_file()
        assert len(list((out / "checkpoints").glob("best-*.ckpt"))) == 1
        assert (out / "csv" / "version_0" / "metrics.csv").is_file()
        assert (out / ".hydra" / "config.yaml").is_file()
        metrics = json.loads((out / "metrics.json").read_text())
        for key in STABLE_KEYS + [f"test/vqa_acc/{f}" for f in DEFAULT_FAMILIES]:
            assert key in metrics, (fusion, key)
            assert 0 <= metrics[key] <= (1 if "acc" in key or "/r" in key or "bleu" in key else float("inf"))
        bundle = out / "bundle"
        assert {p.name for p in bundle.iterdir()} == {
            "config.yaml", "tokenizer", "decoder_tokenizer", "answers.json", "ingredients.json", "model.safetensors"}
        assert not list(out.glob(".bundle*"))  # no temporary folder left behind by the atomic save


def test_bundle_round_trip_gives_the_same_outputs(trained, tmp_path):
    cfg, metrics, out = trained
    bundle = Bundle.load(out / "bundle")
    image = sorted((Path(cfg.paths.data_dir) / "shapes").glob("shapes-*/images/test_*.png"))[0]
    a1 = bundle.answer(image, "what colour is the circle?", return_attention=True)
    assert a1.answer in bundle.answers and len(a1.top) == 5
    assert abs(sum(p for _, p in a1.top) - sum(sorted((p for _, p in a1.top), reverse=True))) < 1e-9
    assert a1.attention.shape == (bundle.model.grid, bundle.model.grid)
    caption = bundle.caption(image)
    emb_i, emb_t = bundle.embed_image([image]), bundle.embed_text(["a red circle", "a blue square"])
    assert emb_i.shape == (1, cfg.model.embed_dim) and emb_t.shape == (2, cfg.model.embed_dim)
    assert torch.allclose(emb_i.norm(dim=-1), torch.ones(1))

    again = Bundle.load(bundle.save(tmp_path / "copy"))
    a2 = again.answer(Image.open(image), "what colour is the circle?", return_attention=True)
    assert a2.top == a1.top  # a PIL image and its path give the same answer, before and after the copy
    assert torch.allclose(a2.attention, a1.attention)
    assert again.caption(image) == caption
    assert torch.allclose(again.embed_image([image]), emb_i)


def test_a_batch_of_questions_is_answered_as_one_at_a_time(trained):
    from mmqa.errors import MMQAError

    cfg, metrics, out = trained
    bundle = Bundle.load(out / "bundle")
    images = sorted((Path(cfg.paths.data_dir) / "shapes").glob("shapes-*/images/test_*.png"))[:3]
    questions = ["what colour is the circle?", "how many squares are there?", "is there a red triangle?"]
    batch = bundle.answer_batch(images, questions, return_attention=True)
    for image, question, got in zip(images, questions, batch):
        one = bundle.answer(image, question, return_attention=True)
        assert got.answer == one.answer and [a for a, _ in got.top] == [a for a, _ in one.top]
        assert [p for _, p in got.top] == pytest.approx([p for _, p in one.top], abs=1e-5)  # padding is masked
        assert torch.allclose(got.attention, one.attention, atol=1e-5)
    # one image for every question: encoded once, the same answers as the image repeated
    shared = bundle.answer_batch(images[:1], questions, return_attention=True)
    repeated = bundle.answer_batch(images[:1] * 3, questions, return_attention=True)
    for a, b in zip(shared, repeated):
        assert [x for x, _ in a.top] == [x for x, _ in b.top]
        assert [p for _, p in a.top] == pytest.approx([p for _, p in b.top], abs=1e-5)
        assert torch.allclose(a.attention, b.attention, atol=1e-5)
    assert bundle.caption_batch(images) == [bundle.caption(im) for im in images]
    with pytest.raises(MMQAError, match=r"answer_batch: 3 images but 2 questions"):
        bundle.answer_batch(images, questions[:2])


def test_broken_bundle_says_what_is_missing(trained, tmp_path):
    from mmqa.errors import MMQAError

    with pytest.raises(MMQAError, match=r"is not an mmqa bundle: missing config.yaml, tokenizer"):
        Bundle.load(tmp_path)


def test_resume_from_last_checkpoint_of_the_same_config(data_dir, tmp_path):
    runs = tmp_path / "runs"
    first = train(compose_cfg(data_dir, runs / "a"))
    assert first["train/epochs"] == 1
    # a different config has no run to resume
    with pytest.raises(ConfigError, match="ckpt_path=last: no earlier run of this config"):
        train(compose_cfg(data_dir, runs / "b", ["ckpt_path=last", "seed=1"]))
    resumed = train(compose_cfg(data_dir, runs / "c", ["ckpt_path=last", "trainer.max_epochs=2"]))
    assert resumed["train/epochs"] == 2  # continued from epoch 1, not from scratch


def test_missing_checkpoint_file_is_a_clear_error(data_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"ckpt_path: no checkpoint file at .*nope.ckpt"):
        train(compose_cfg(data_dir, tmp_path / "r", [f"ckpt_path={tmp_path}/nope.ckpt"]))


def test_evaluate_cli_reproduces_the_training_test_metrics(trained, data_dir, tmp_path):
    cfg, metrics, out = trained
    run(["-m", "mmqa", "evaluate", f"bundle={out / 'bundle'}", *TINY_DATA, f"paths.data_dir={data_dir}",
         f"hydra.run.dir={tmp_path / 'eval'}"])
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in ("test/vqa_acc", "test/bleu4", "test/r1_t2i", "test/r1_i2t"):
        assert evaluated[key] == pytest.approx(metrics[key], abs=1e-6), key


def test_evaluate_refuses_an_unknown_split_before_loading_anything(data_dir, tmp_path):
    from mmqa.cli.evaluate import evaluate

    cfg = compose_cfg(data_dir, tmp_path, config_name="evaluate", overrides=["bundle=/nowhere", "split=dev"])
    with pytest.raises(ConfigError, match=r"split='dev' is not a split; valid: train, val, test"):
        evaluate(cfg)


def test_a_bundle_written_before_the_renames_still_loads(trained, tmp_path):
    """Bundles store the classes they were built from; one written before the decoder, the readers and
    the image normalisation moved is read in today's terms, and answers as it did."""
    import shutil

    import yaml

    cfg, metrics, out = trained
    old = tmp_path / "old"
    shutil.copytree(out / "bundle", old)
    conf = yaml.safe_load((old / "config.yaml").read_text())
    conf["model"]["decoder"]["_target_"] = "mmqa.models.decoder.CaptionDecoder"
    conf["data"]["reader"]["_target_"] = "mmqa.data.builtin.ShapesReader"
    enc = conf["model"]["image_encoder"]
    conf["data"]["mean"], conf["data"]["std"] = enc.pop("mean"), enc.pop("std")
    (old / "config.yaml").write_text(yaml.safe_dump(conf))
    image = sorted((Path(cfg.paths.data_dir) / "shapes").glob("shapes-*/images/test_*.png"))[0]
    then, now = Bundle.load(old), Bundle.load(out / "bundle")
    assert type(then.model.decoder).__name__ == "GPT2Decoder"
    assert then.cfg.data.reader._target_ == "mmqa.data.readers.shapes.ShapesReader"
    assert then.answer(image, "what colour is the circle?").top == now.answer(image, "what colour is the circle?").top


def test_python_m_mmqa_lists_its_tools_and_refuses_an_unknown_one():
    proc = subprocess.run([sys.executable, "-m", "mmqa", "evaluat"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown tool 'evaluat'; valid: evaluate, breakdown, index, report" in proc.stderr
