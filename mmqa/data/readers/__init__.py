"""Dataset readers, one file per format, mirroring `conf/data/reader/`: the JSONL manifest
(`jsonl.py`), official VQAv2 (`vqav2.py`), COCO captions (`coco_captions.py`), Recipe1M
(`recipe1m.py`) and the built-in procedural worlds (`shapes.py`, `dishes.py`). The contract they
share is in `base.py`."""
