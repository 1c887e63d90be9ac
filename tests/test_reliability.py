"""Bad training data, config mistakes and hostile files: each fails at start-up with one clear error
that names the file and line or the key, or, for data with `data.on_bad_sample=skip`, is dropped and
listed; no pickled code is ever run."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF, NORMALIZATION, ROOT, path_overrides
from hydra import compose, initialize_config_dir
from PIL import Image

from mmqa.checkpointing import AtomicCheckpointIO, UnsafeCheckpointError
from mmqa.config_check import check_config
from mmqa.data.datamodule import MMQADataModule
from mmqa.data.images import load_image
from mmqa.data.readers.jsonl import JsonlReader
from mmqa.data.validate import SkipLog
from mmqa.data.tokenizer import train_tokenizer
from mmqa.errors import ConfigError, DataError, MMQAError
from mmqa.train import RUN_KEY, run_key, train

TINY_MODEL = ["debug=tiny_model"]  # conf/debug/tiny_data.yaml sets the shapes generator's sizes


def jsonl_cfg(root: Path, out: Path, *overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=[*TINY_MODEL, "data=jsonl", f"data.root={root}", *overrides,
                                           *path_overrides(root / "unused", out)])


def png_bytes(mode: str = "RGB", size=(16, 16), fmt: str = "PNG", colour=None) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format=fmt)
    return buf.getvalue()


def line(image: str, i: int) -> str:
    return json.dumps({"image": image, "question": f"what is {i}?", "answers": [f"a{i % 3}"],
                       "captions": [f"picture number {i}"], "question_type": "attribute"})


def good_images(root: Path, n: int) -> list[str]:
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        Image.new("RGB", (16, 16), (i * 20, 100, 0)).save(root / "images" / f"ok{i}.png")
        names.append(f"images/ok{i}.png")
    return names


# Images that must be read, not refused: palette, grey + alpha, CMYK JPEG, 16-bit grey.
ODD_MODES = {"images/palette.png": png_bytes("P", colour=3), "images/grey_alpha.png": png_bytes("LA", colour=(80, 0)),
             "images/cmyk.jpg": png_bytes("CMYK", fmt="JPEG", colour=(0, 255, 255, 0)),
             "images/sixteen.png": png_bytes("I;16", colour=4000)}


def bad_image_files() -> dict[str, bytes]:
    """name -> contents of files with image extensions that no decoder reads."""
    png, jpeg = png_bytes(size=(64, 64)), png_bytes(size=(64, 64), fmt="JPEG")
    return {"images/truncated.png": png[: len(png) // 2], "images/truncated.jpg": jpeg[: len(jpeg) // 2],
            "images/empty.png": b"", "images/notes.jpg": b"shopping list: eggs, milk\n"}


@pytest.fixture
def messy_dataset(tmp_path) -> Path:
    """12 good images, 4 in odd modes, and every kind of bad sample, one per line of train.jsonl."""
    root = tmp_path / "messy"
    names = good_images(root, 12) + list(ODD_MODES)
    for name, data in {**ODD_MODES, **bad_image_files()}.items():
        (root / name).write_bytes(data)
    lines = [line(n, i).encode() for i, n in enumerate(names)]
    lines += [line(n, 99).encode() for n in bad_image_files()]          # lines 17-20: unreadable images
    lines += [b'{"image": "images/ok0.png", "question": "q?",',           # 21: malformed JSON
              b'{"question": "what?", "answers": ["x"]}',                # 22: no image
              line("images/missing.png", 5).encode(),                      # 23: image path not on disk
              line("images/ok1.png", 1).replace('"a1"', '"a2"').encode(),  # 24: line 2 with another answer
              '{"image": "images/ok2.png", "captions": ["caf\u00e9"]}'.encode("latin-1"),  # 25: not UTF-8
              line("images/ok1.png", 1).encode()]                          # 26: line 2 again: kept once
    (root / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root


def datamodule(root: Path, on_bad_sample: str = "raise") -> MMQADataModule:
    return MMQADataModule(JsonlReader(root), image_size=16, batch_size=4,
                          eval_batch_size=4, num_workers=0, val_fraction=0.2, split_seed=0, answer_top_k=10,
                          max_question_length=16, max_caption_length=16, max_captions_per_image=2,
                          max_recipe_length=64, ingredient_top_k=10, concept_top_k=0, on_bad_sample=on_bad_sample)


# ---------------------------------------------------------------------------------------- bad data


def test_raise_stops_before_training_with_file_line_and_problem(messy_dataset, tmp_path):
    out = tmp_path / "run"
    manifest = re.escape(str((messy_dataset / "train.jsonl").resolve()))
    with pytest.raises(DataError, match=rf"^{manifest}:21: malformed JSON \(Expecting"):
        train(jsonl_cfg(messy_dataset, out))
    assert not (out / "checkpoints").exists() and not (out / "bundle").exists()  # nothing was fitted


@pytest.mark.parametrize("name", sorted(bad_image_files()))
def test_each_unreadable_image_names_its_manifest_line_and_file(tmp_path, name):
    root = tmp_path / "d"
    good = good_images(root, 3)
    (root / name).write_bytes(bad_image_files()[name])
    (root / "train.jsonl").write_text("\n".join(line(n, i) for i, n in enumerate([*good, name])))
    why = r"empty file" if name.startswith("images/empty") else r"\w+Error: .+"
    with pytest.raises(DataError, match=rf"train\.jsonl:4: {re.escape(str(root.resolve() / name))}: "
                                        rf"not a readable image \({why}\); data\.on_bad_sample=skip"):
        datamodule(root).load_records()


def test_skip_trains_on_the_rest_and_lists_what_it_dropped(messy_dataset, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mmqa")
    out = tmp_path / "run"
    metrics = train(jsonl_cfg(messy_dataset, out, "data.on_bad_sample=skip", "data.val_fraction=0.25"))
    assert 0 <= metrics["val/vqa_acc"] <= 1 and (out / "bundle" / "model.safetensors").is_file()
    skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    by_line = {int(s["where"].rsplit(":", 1)[1]): s["problem"] for s in skipped}
    assert sorted(by_line) == list(range(17, 26))
    assert all(by_line[n].endswith("not a readable image") or "not a readable image (" in by_line[n] for n in range(17, 21))
    assert by_line[21].startswith("malformed JSON")
    assert by_line[22] == "missing required key 'image'"
    assert by_line[23].startswith("image not found: ")
    assert by_line[24].startswith("conflicting repeat of line 2: 'what is 1?' about images/ok1.png has answers "
                                  "['a2'] here and ['a1'] there; data.reader.repeated_questions=annotators")
    assert by_line[25].startswith("line is not valid UTF-8")
    assert {s["split"] for s in skipped} == {"train"}
    assert "skipped 9 bad samples: 4 not a readable image" in caplog.text
    assert "train.jsonl: 1 repeat(s) of an earlier line's question about the same image, each question kept once" \
        in caplog.text
    # the four odd-mode images are trained on, not dropped
    records = datamodule(messy_dataset, "skip").load_records()
    kept = {r.id for split in ("train", "val") for r in records[split]}
    assert kept == {f"images/ok{i}.png" for i in range(12)} | set(ODD_MODES)
    ok1 = next(r for split in ("train", "val") for r in records[split] if r.id == "images/ok1.png")
    assert [qa.answers for qa in ok1.questions] == [["a1"]]  # line 26 kept once, line 24 dropped


def test_the_skip_summary_stays_one_short_line_for_ten_thousand_samples(tmp_path):
    log = SkipLog("skip")
    for i in range(10_000):
        where = f"{tmp_path}/train.jsonl:{i + 2}"
        problem = (f"conflicting repeat of line {i + 1}: 'what is {i}?' about images/{i}.png has answers ['a'] "
                   "here and ['b'] there" if i % 4 else f"image not found: {tmp_path}/images/{i}.png")
        log.add("train", where, DataError(f"{where}: {problem}"))
    summary = log.summary()
    assert len(summary) < 300, summary
    assert summary.startswith("skipped 10000 bad samples: 7500 conflicting repeat of line, 2500 image not found; "
                              "first: train.jsonl:2 (image not found: ")
    log.write(tmp_path / "skipped.jsonl")  # the full list stays in the file
    assert len((tmp_path / "skipped.jsonl").read_text().splitlines()) == 10_000


def test_odd_modes_become_rgb():
    cases = {"P": ("P", 3, None), "LA transparent": ("LA", (80, 0), (255, 255, 255)), "LA opaque": ("LA", (80, 255), (80, 80, 80)),
             "I;16": ("I;16", 4000, (255, 255, 255)), "CMYK": ("CMYK", (0, 0, 0, 0), (255, 255, 255))}
    for name, (mode, colour, rgb) in cases.items():
        img = load_image(io.BytesIO(png_bytes(mode, colour=colour, fmt="JPEG" if mode == "CMYK" else "PNG")))
        assert img.mode == "RGB" and img.size == (16, 16), name
        if rgb is not None:
            assert np.abs(np.asarray(img).astype(int) - rgb).max() <= 2, name


def test_an_image_that_breaks_mid_epoch_names_the_file_from_a_worker(tmp_path):
    root = tmp_path / "d"
    names = good_images(root, 4)
    (root / "train.jsonl").write_text("\n".join(line(n, i) for i, n in enumerate(names)))
    dm = datamodule(root)
    dm.num_workers = 1
    tok = train_tokenizer(dm.train_texts(), 100, 1)  # reads and checks the records: all fine so far
    dm.attach(tok, tok, dm.answer_vocab(), [], [], NORMALIZATION)
    (root / names[2]).write_bytes(b"")  # the file breaks after the start-up check
    with pytest.raises(DataError, match=re.escape(f"{root.resolve() / names[2]}: not a readable image (empty file)")):
        for split in ("train", "val"):  # wherever the split put it
            for _ in dm.loader(split, train=split == "train"):
                pass


# ----------------------------------------------------------------------------------- config mistakes


def test_config_mistakes_are_all_listed_with_the_valid_keys(tiny_cfg, tmp_path):
    cfg = tiny_cfg("+optim.lrr=1", "data.batch_size=abc", "+model.fusion.deptth=3", "+generation.num_beam=3",
                   "+loss.vqaa=1", "+seeed=1")
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    message = str(e.value)
    assert message.startswith("invalid config (6 problems):")
    for expected in [
        "optim.lrr: unknown key (did you mean 'lr'?); torch.optim.AdamW takes: params, lr, betas,",
        "data.batch_size: expected int, got 'abc' (str)",
        "model.fusion.deptth: unknown key (did you mean 'depth'?); mmqa.models.fusion.AnchoredFusion takes: dim, depth,",
        "generation.num_beam: not an option of transformers' generate (did you mean 'num_beams'?)",
        "loss.vqaa: unknown key (did you mean 'vqa'?); valid keys: caption, concepts, contrastive, ingredients, recipe, vqa",
        "seeed: unknown key (did you mean 'seed'?); valid keys: callbacks, ckpt_path, compile, data,",
    ]:
        assert f"  - {expected}" in message, expected


@pytest.mark.parametrize("overrides, problem", [
    (["data.batch_size=1"], "loss.contrastive=0.5 needs data.batch_size >= 2"),
    (["data.max_captions_per_image=0"], "data.max_captions_per_image must be >= 1"),
    (["data.on_bad_sample=maybe"], "data.on_bad_sample: 'maybe' is not an option; valid: raise, skip"),
    (["data.concept_top_k=-1"], "data.concept_top_k must be >= 0 (0: no concept loss), got -1"),
    (["+data.vqa_family_weight.spatial=-1"], "data.vqa_family_weight.spatial must be a number >= 0, got -1"),
    (["+data.vqa_family_weight.spatial=lots"], "data.vqa_family_weight.spatial must be a number >= 0, got 'lots'"),
    (["model.fusion.heads=5"], "model.fusion: width 32 is not divisible by heads=5"),
    (["scheduler=warmup_stable_decay", "scheduler.decay_fraction=0.99"],
     "scheduler.decay_fraction must be in (0, 1 - warmup_fraction], got 0.99"),
    (["model.image_encoder.patch_size=5"], "data.image_size=32 is not a multiple of model.image_encoder.patch_size=5"),
    (["model.image_encoder.stem_strides=[2,2,2,2]"], "model.image_encoder.stem_strides=[2, 2, 2, 2] must give one "
                                                     "stride per stem_channels entry (4) and multiply to "
                                                     "model.image_encoder.patch_size=8"),
])
def test_impossible_combinations_fail_at_start_up(tiny_cfg, tmp_path, overrides, problem):
    with pytest.raises(ConfigError, match=re.escape(problem)):
        train(tiny_cfg(*overrides))
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_all_losses_off_is_refused(tiny_cfg):
    cfg = tiny_cfg()
    for term in cfg.loss:
        cfg.loss[term] = 0.0
    with pytest.raises(ConfigError, match=r"loss: every weight is 0 \(.*\): nothing to train"):
        check_config(cfg)


def test_every_shipped_option_passes_the_check(tiny_cfg):
    for overrides in [(), ("model/fusion=early",), ("model/fusion=late",), ("trainer=ddp",), ("loss=vqa",),
                      ("loss=vqa_caption", "data.batch_size=1"), ("logger=tensorboard",),
                      ("scheduler=warmup_stable_decay",)]:
        check_config(tiny_cfg(*overrides))


# ------------------------------------------------------------------------------------- safe loading


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_planted_pickle_checkpoint_is_refused_without_running_it(tiny_cfg, tmp_path):
    marker = tmp_path / "pwned"
    cfg = tiny_cfg("ckpt_path=last")
    # an earlier "run" of this very config whose last.ckpt carries the payload
    planted = tmp_path / "planted"
    (planted / "checkpoints").mkdir(parents=True)
    (planted / RUN_KEY).write_text(run_key(cfg))
    tok = train_tokenizer(["a red circle", "what colour is it"], 50, 1)
    from mmqa.bundle import write_assets

    write_assets(planted / "bundle", cfg, tok, tok, ["red"])
    torch.save({"state_dict": {}, "epoch": 0, "global_step": 0, "evil": Payload(marker)},
               planted / "checkpoints" / "last.ckpt")

    with pytest.raises(UnsafeCheckpointError, match=r"last\.ckpt: refused: .*GLOBAL posix\.system"):
        train(cfg)
    with pytest.raises(UnsafeCheckpointError):
        AtomicCheckpointIO().load_checkpoint(planted / "checkpoints" / "last.ckpt", weights_only=False)
    assert not marker.exists()


def test_a_bundle_config_with_a_python_tag_is_refused(tmp_path):
    from mmqa.bundle import Bundle

    marker = tmp_path / "pwned"
    for part in ("tokenizer", "decoder_tokenizer"):
        (tmp_path / part).mkdir()
    (tmp_path / "answers.json").write_text("[]")
    (tmp_path / "config.yaml").write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(MMQAError, match=r"config.yaml: not a valid bundle config: .*python/object/apply:os.system"):
        Bundle.load(tmp_path)
    assert not marker.exists()


def test_no_code_path_can_unpickle_or_trust_remote_code():
    sources = [*ROOT.glob("*.py"), *(ROOT / "mmqa").rglob("*.py")]
    unsafe = re.compile(r"trust_remote_code\s*=\s*True|weights_only\s*=\s*False|pickle\.loads?\(|torch\.load\((?![^)]*weights_only=True)")
    found = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in sources for m in unsafe.finditer(p.read_text())]
    assert found == []
