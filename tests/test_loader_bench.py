"""benchmarks/loader.py's dataset writer: what it writes loads through the real config and reader."""

from __future__ import annotations

import importlib.util

from hydra.utils import instantiate
from PIL import Image

from conftest import ROOT

spec = importlib.util.spec_from_file_location("loader_bench", ROOT / "benchmarks" / "loader.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_written_dataset_loads_through_data_jsonl_with_every_image_and_label(tmp_path):
    for fmt in ("png", "jpeg"):
        bench.write_dataset(tmp_path / fmt, 5, 64, fmt, n_val=2, questions=3, captions=2)
    cfg = bench.config(tmp_path / "jpeg", 64, 0, [])
    assert cfg.data.reader._target_ == "mmqa.data.readers.jsonl.JsonlReader"
    records = instantiate(cfg.data).load_records()
    assert (len(records["train"]), len(records["val"]), len(records["test"])) == (5, 2, 0)
    for r in records["train"]:
        assert r.image.suffix == ".jpg"
        assert len(r.captions) == 2 and len(r.questions) == 3
        assert all(len(qa.answers) == 1 and qa.family for qa in r.questions)
        with Image.open(r.image) as img:
            assert (img.format, img.size) == ("JPEG", (64, 64))
    # one seed, the same scenes and text in every format: only the image files differ
    png = (tmp_path / "png" / "train.jsonl").read_text()
    assert png.replace(".png", ".jpg") == (tmp_path / "jpeg" / "train.jsonl").read_text()
