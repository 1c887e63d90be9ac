"""Serve a trained model in the browser:
`python demo.py [--bundle PATH] [--gallery DIR] [--index DIR] [--host H] [--port P] [--share]`.

Without `--bundle`, the newest `outputs/train/runs/*/bundle` (as `python train.py` writes them, relative
to the current directory) is served. The Search tab searches the images under `--gallery` (default: the
test images of the built-in dataset the bundle was trained on), indexed once at start-up or loaded from
`--index` (default `DIR/.mmqa-index`). The page itself is `mmqa.app.build_demo`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmqa.app import build_demo
from mmqa.bundle import WEIGHTS, Bundle
from mmqa.errors import MMQAError

RUNS = Path("outputs/train/runs")
QUEUE_SIZE = 20  # requests waiting at once; more are refused with "queue full"
TRAIN_HINT = "Train one first: `python train.py` (in this environment) or `make train` (from a fresh clone)."


def newest_bundle(runs: Path = RUNS) -> Path | None:
    """The most recently written bundle with weights (a run still training has none yet)."""
    weights = max(runs.glob(f"*/bundle/{WEIGHTS}"), key=lambda p: p.stat().st_mtime, default=None)
    return weights.parent if weights else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help=f"a bundle folder (default: the newest {RUNS}/*/bundle)")
    parser.add_argument("--gallery", type=Path,
                        help="a folder of images to search (default: the built-in dataset's test images)")
    parser.add_argument("--index", type=Path, help="where the gallery's index is kept (default: GALLERY/.mmqa-index); "
                        "alone, an index built by `python -m mmqa.index build`")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    args = parser.parse_args(argv)

    path = args.bundle or newest_bundle()
    if path is None:
        print(f"No trained bundle under {RUNS.resolve()}/*/bundle. {TRAIN_HINT}", file=sys.stderr)
        return 2
    try:
        bundle = Bundle.load(path)
    except MMQAError as e:
        print(f"{e}. {TRAIN_HINT}", file=sys.stderr)
        return 2
    try:
        demo = build_demo(bundle, gallery=args.gallery, index_dir=args.index)
    except MMQAError as e:  # a gallery or index that cannot be searched
        print(str(e), file=sys.stderr)
        return 2
    demo.queue(max_size=QUEUE_SIZE).launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
