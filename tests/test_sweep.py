"""A real sweep through the Hydra command line, then the report over it: `train.py -m` with an
experiment preset on the tiny config, and `python -m mmqa report` over the multirun folder it wrote."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

from conftest import ROOT, TINY


def test_multirun_of_a_preset_then_report(data_dir, tmp_path):
    sweep = tmp_path / "multirun"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # the preset's own sweep (3 fusions x 3 seeds), narrowed from the command line to 2 fusions x 1 seed
    args = ["train.py", "-m", "experiment=fusion_ablation", "model/fusion=early,cross", "seed=0", *TINY,
            f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert all((sweep / j / "metrics.json").is_file() and (sweep / j / "bundle" / "model.safetensors").is_file()
               for j in ("0", "1"))

    proc = subprocess.run([sys.executable, "-m", "mmqa", "report", str(sweep)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert sorted((r["model/fusion"], r["seeds"], r["failed"]) for r in rows) == [("cross", "1", "0"), ("early", "1", "0")]
    assert all(0 <= float(r["test/vqa_acc mean"]) <= 1 for r in rows)
    assert (sweep / "per_family.png").read_bytes()[:4] == b"\x89PNG"
