"""Serve a trained model in the browser:
`python demo.py [--bundle PATH] [--gallery DIR] [--index DIR] [--clip NAME --clip-pretrained WEIGHTS]
[--host H] [--port P] [--share] [--train-if-missing]`.

Without `--bundle`, the newest `outputs/train/runs/*/bundle` (as `python train.py` writes them, relative
to the current directory) is served; when there is none, `--train-if-missing` runs `python train.py`
first (its progress shown as it goes), otherwise the command that trains one is named. The Search tab
searches the images under `--gallery` (default: the test images of the built-in dataset the bundle was
trained on), indexed once at start-up or loaded from `--index` (default `DIR/.mmqa-index`), embedded by
the bundle's contrastive towers or, with `--clip`, by a real open_clip model. The page itself is
`mmqa.app.build_demo`, served by `mmqa.app.launch`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf
from PIL import Image

from mmqa.app import build_demo, launch
from mmqa.app.inputs import MAX_PIXELS
from mmqa.app.serve import CONCURRENCY, HOST, MAX_FILE_SIZE, PORT, QUEUE_SIZE
from mmqa.bundle import WEIGHTS, Bundle
from mmqa.errors import MMQAError
from mmqa.image_index import open_clip_towers

RUNS = Path("outputs/train/runs")
TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"
TRAIN_HINT = ("Train one first: `python train.py` (in this environment) or `make train` (from a fresh clone), "
              "or start the demo with --train-if-missing.")


def newest_bundle(runs: Path = RUNS) -> Path | None:
    """The most recently written bundle with weights (a run still training has none yet)."""
    weights = max(runs.glob(f"*/bundle/{WEIGHTS}"), key=lambda p: p.stat().st_mtime, default=None)
    return weights.parent if weights else None


def train_default() -> int:
    """`python train.py` with the default config, in the current directory (so its bundle lands in
    RUNS); its output, progress bars included, goes straight to this terminal. Returns its exit code."""
    print(f"No trained bundle under {RUNS.resolve()}: training the default model (`python train.py`)…", flush=True)
    return subprocess.run([sys.executable, str(TRAIN_SCRIPT)], check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help=f"a bundle folder (default: the newest {RUNS}/*/bundle)")
    parser.add_argument("--train-if-missing", action="store_true",
                        help="when no bundle exists, run the default training first, then serve its bundle")
    parser.add_argument("--gallery", type=Path,
                        help="a folder of images to search (default: the built-in dataset's test images)")
    parser.add_argument("--index", type=Path, help="where the gallery's index is kept (default: GALLERY/.mmqa-index); "
                        "alone, an index built by `python -m mmqa index build`")
    parser.add_argument("--clip", metavar="NAME", help="search with a real open_clip model: a name (ViT-B-32), a "
                        "model config .json, or local-dir:FOLDER")
    parser.add_argument("--clip-pretrained", metavar="NAME_OR_FILE",
                        help="its weights: an open_clip tag or a .safetensors/.pt file")
    parser.add_argument("--host", default=HOST, help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=PORT)
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="larger uploaded images are refused unread")
    parser.add_argument("--max-file-size", default=MAX_FILE_SIZE, help="the largest upload (e.g. 50mb)")
    parser.add_argument("--queue-size", type=int, default=QUEUE_SIZE, help="requests that may wait at once")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY, help="model calls that may run at once")
    parser.add_argument("--static-cache", action="store_true",
                        help="captions decode with a static KV cache and a compiled step: greedy captions about 1.4x "
                             "faster on a CPU, after a compile of about 20 s at start (and again for each new length)")
    args = parser.parse_args(argv)
    if args.clip and not args.clip_pretrained and not args.clip.startswith(("local-dir:", "hf-hub:")):
        parser.error("--clip needs --clip-pretrained (a randomly initialised CLIP finds nothing)")

    path = args.bundle or newest_bundle()
    if path is None and args.train_if_missing:
        code = train_default()
        if code != 0:
            print(f"Training failed (exit code {code}); no demo to serve.", file=sys.stderr)
            return 2
        path = newest_bundle()
    if path is None:
        print(f"No trained bundle under {RUNS.resolve()}/*/bundle. {TRAIN_HINT}", file=sys.stderr)
        return 2
    try:
        bundle = Bundle.load(path)
    except MMQAError as e:
        print(f"{e}. {TRAIN_HINT}", file=sys.stderr)
        return 2
    if args.static_cache:
        OmegaConf.update(bundle.cfg, "generation.cache_implementation", "static", force_add=True)
        print("compiling the caption decoding step (static KV cache) ...", file=sys.stderr)
        bundle.caption(Image.new("RGB", (bundle.cfg.data.image_size,) * 2))  # the first user does not wait for it
    try:
        towers = open_clip_towers(args.clip, args.clip_pretrained) if args.clip else None
        demo = build_demo(bundle, gallery=args.gallery, index_dir=args.index, towers=towers,
                          max_pixels=args.max_pixels)
    except MMQAError as e:  # a gallery, index or CLIP model that cannot be used
        print(str(e), file=sys.stderr)
        return 2
    launch(demo, host=args.host, port=args.port, share=args.share, queue_size=args.queue_size,
           concurrency=args.concurrency, max_file_size=args.max_file_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
