"""Build the image index a demo or script searches:
`python -m mmqa.index build --bundle B --images DIR [--out OUT]`.

Every image under DIR (png, jpg, jpeg, webp, bmp; recursively, in sorted order) is embedded by the
bundle's image tower and saved to OUT (default `DIR/.mmqa-index`, where `demo.py --gallery DIR`
looks first). Unreadable files are skipped and listed. The index itself is `mmqa.retrieval`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmqa.bundle import Bundle
from mmqa.errors import MMQAError
from mmqa.retrieval import BATCH_SIZE, INDEX_DIR, ImageIndex, bundle_model_id, find_images


def build(bundle_dir: Path, images: Path, out: Path, batch_size: int = BATCH_SIZE, progress: bool = True) -> ImageIndex:
    bundle = Bundle.load(bundle_dir)
    index = ImageIndex.build(bundle.embed_image, find_images(images), batch_size, progress,
                             model_id=bundle_model_id(bundle))
    index.save(out)
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmqa.index", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("build", help="embed every image of a folder and save the index")
    p.add_argument("--bundle", type=Path, required=True, help="the trained bundle whose image tower embeds")
    p.add_argument("--images", type=Path, required=True, help="the folder of images (searched recursively)")
    p.add_argument("--out", type=Path, help=f"where to write the index (default: IMAGES/{INDEX_DIR})")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images embedded at once")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    out = args.out or args.images / INDEX_DIR
    try:
        index = build(args.bundle, args.images, out, args.batch_size, not args.no_progress)
    except MMQAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"indexed {len(index)} images ({index.dim}-d embeddings) into {out}")
    if index.skipped:
        print(f"skipped {len(index.skipped)} unreadable files:", file=sys.stderr)
        for _, why in index.skipped:
            print(f"  {why}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
