"""`trainer=ddp`: a real 2-process DDP fit on CPU (gloo) through `train.py`. The ranks must train on
different images, and the logged validation accuracy must be the one over both ranks' questions."""

from __future__ import annotations

import json

from conftest import TINY
from test_train_e2e import run


def test_two_process_ddp_splits_data_and_reduces_metrics(data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    run(["train.py", *TINY, "trainer=ddp", f"paths.data_dir={data_dir}", f"hydra.run.dir={out}",
         "+callbacks.probe._target_=tests.ddp_probe.SeenProbe", f"+callbacks.probe.out={out}"])
    ranks = [json.loads((out / f"probe_rank{r}.json").read_text()) for r in (0, 1)]
    seen0, seen1 = set(ranks[0]["ids"]), set(ranks[1]["ids"])
    assert seen0 and seen1 and not seen0 & seen1  # a DistributedSampler shard each
    assert seen0 | seen1 == set(range(24))  # together: the whole training split, once
    metrics = json.loads((out / "metrics.json").read_text())
    global_acc = (ranks[0]["sum"] + ranks[1]["sum"]) / (ranks[0]["count"] + ranks[1]["count"])
    assert ranks[0]["count"] > 0 and ranks[1]["count"] > 0
    assert abs(metrics["val/vqa_acc"] - global_acc) < 1e-6
    assert (out / "bundle" / "model.safetensors").is_file()  # written once, by rank 0
