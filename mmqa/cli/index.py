"""Build the image index a demo or script searches:
`python -m mmqa index build (--bundle B | --clip NAME --clip-pretrained WEIGHTS) --images DIR [--out OUT]
[--search auto|exact|flat|ivf|hnsw]`.

Every image under DIR (png, jpg, jpeg, webp, bmp; recursively, in sorted order) is embedded by the
bundle's image tower, or by a real open_clip model, and saved to OUT (default `DIR/.mmqa-index`, where
`demo.py --gallery DIR` looks first; the demo reuses it when started with the same towers). Unreadable
files are skipped and listed. It says how the gallery will be searched: by default by its size (exact
up to `APPROX_THRESHOLD` images, a faiss IVF index above it, built on the first search); `--search`
forces a kind, which the saved index records. The index itself is `mmqa.image_index`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmqa.bundle import Bundle
from mmqa.errors import MMQAError
from mmqa.image_index import (
    APPROX_THRESHOLD,
    BATCH_SIZE,
    INDEX_DIR,
    SEARCH_KINDS,
    ImageIndex,
    Towers,
    bundle_towers,
    choose_search,
    find_images,
    open_clip_towers,
)


def build(towers: Towers | Path, images: Path, out: Path, batch_size: int = BATCH_SIZE,
          progress: bool = True, search: str = "auto") -> ImageIndex:
    """Index every image under `images` with `towers` (or a bundle folder's own) into `out`, to be
    searched as `search` says (see `mmqa.image_index.choose_search`)."""
    choose_search(0, search)  # a forced faiss kind without faiss fails here, before any embedding
    if not isinstance(towers, Towers):
        towers = bundle_towers(Bundle.load(towers))
    index = ImageIndex.build(towers.embed_image, find_images(images), batch_size, progress, model_id=towers.model_id,
                             search=search)
    index.save(out)
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmqa index", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("build", help="embed every image of a folder and save the index")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--bundle", type=Path, help="the trained bundle whose image tower embeds")
    which.add_argument("--clip", metavar="NAME", help="an open_clip model instead (as demo.py --clip)")
    p.add_argument("--clip-pretrained", metavar="NAME_OR_FILE", help="the open_clip model's weights")
    p.add_argument("--images", type=Path, required=True, help="the folder of images (searched recursively)")
    p.add_argument("--out", type=Path, help=f"where to write the index (default: IMAGES/{INDEX_DIR})")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images embedded at once")
    p.add_argument("--search", choices=SEARCH_KINDS, default="auto",
                   help=f"how the gallery is searched: auto (exact up to {APPROX_THRESHOLD:,} images, faiss IVF "
                        "above), exact (matrix product), flat (faiss IndexFlatIP), ivf or hnsw (faiss, approximate)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    out = args.out or args.images / INDEX_DIR
    try:
        towers = open_clip_towers(args.clip, args.clip_pretrained) if args.clip else args.bundle
        index = build(towers, args.images, out, args.batch_size, not args.no_progress, args.search)
    except MMQAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"indexed {len(index)} images ({index.dim}-d embeddings) into {out}")
    why = f"by size, exact up to {APPROX_THRESHOLD:,} images" if args.search == "auto" else "as --search asks"
    print(f"search: {index.describe_search()} ({why})")
    if index.skipped:
        print(f"skipped {len(index.skipped)} unreadable files:", file=sys.stderr)
        for _, why in index.skipped:
            print(f"  {why}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
