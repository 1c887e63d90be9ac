"""COCO-style captions JSON ("images" + "annotations") with an image folder per split."""

from __future__ import annotations

from mmqa.data.readers.base import ImageChecker, OnBad, Samples, SplitMapReader, add_unique, entries, field, load_json
from mmqa.data.records import ImageRecord
from mmqa.errors import DataError


class CocoCaptionsReader(SplitMapReader):
    """COCO captions: `annotations/captions_<name>.json` and the images `<name>/<file_name>` under `root`.

    Records follow the file's "images" order; an image without any caption carries no label and is
    left out. Captions are stripped of surrounding whitespace; duplicates on one image are dropped.
    """

    DEFAULT_SPLITS = {"train": "train2017", "val": "val2017"}

    def read(self, split: str, on_bad: OnBad | None = None) -> list[ImageRecord] | None:
        if (found := self.located(split)) is None:
            return None
        root, name = found
        path = root / "annotations" / f"captions_{name}.json"
        if not path.is_file():
            return None
        data = load_json(path)
        samples = Samples(on_bad)
        images: dict[int, tuple[str, list[str], str]] = {}  # image id -> (file_name, captions, where)
        for i, entry in enumerate(entries(data, "images", path)):
            where = f"{path}: images[{i}]"
            with samples.one(where):
                image_id = field(entry, "id", int, where)
                file_name = field(entry, "file_name", str, where)
                if image_id in images:
                    raise DataError(f"{where}: image id {image_id} appears twice")
                images[image_id] = (file_name, [], where)
        for i, ann in enumerate(entries(data, "annotations", path)):
            where = f"{path}: annotations[{i}]"
            with samples.one(where):
                image_id = field(ann, "image_id", int, where)
                caption = field(ann, "caption", str, where)
                if image_id not in images:
                    raise DataError(f"{where}: image_id {image_id} has no entry in 'images'")
                add_unique(images[image_id][1], [caption.strip()])

        check = ImageChecker(self.check_images)
        records = []
        for file_name, captions, where in images.values():
            if not captions:
                continue
            image = f"{name}/{file_name}"
            with samples.one(where):
                check(root / image, where)
                records.append(ImageRecord(image=root / image, id=image, captions=captions, source=where))
        return records
