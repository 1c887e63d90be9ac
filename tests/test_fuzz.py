"""Fuzzing the inputs people hand to mmqa: the JSONL reader, the image loader and the VQAv2 and COCO
readers. Whatever the bytes, each call either loads or raises the project's own `MMQAError`, never an
exception from deep inside a library. Bounded (hypothesis, 60 examples each, no deadline) so the
default suite stays fast; failures print the example that broke."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path

# hypothesis keeps notes (constants seen in the source) in ./.hypothesis; not in the work tree
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(Path(tempfile.gettempdir()) / "mmqa-hypothesis"))

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmqa.data.images import load_image
from mmqa.data.readers.coco_captions import CocoCaptionsReader
from mmqa.data.readers.jsonl import JsonlReader
from mmqa.data.readers.vqav2 import VQAv2Reader
from mmqa.errors import MMQAError

FUZZ = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# keys the readers look for, so that examples reach past the first check
jsonl_keys = st.sampled_from(["image", "question", "answers", "captions", "question_type", "family",
                              "question_id", "ingredients", "recipe"])
jsonl_objects = st.dictionaries(jsonl_keys, json_values | st.sampled_from(["a.png", "missing.png", "./a.png"]), max_size=6)


@pytest.fixture(scope="module")
def root():
    """A dataset folder with one real image, a.png; each example rewrites the manifest files."""
    path = Path(tempfile.mkdtemp(prefix="mmqa-fuzz-"))
    Image.new("RGB", (8, 8), (10, 200, 30)).save(path / "a.png")
    yield path
    shutil.rmtree(path)


def loads_or_refuses(read) -> None:
    try:
        read()
    except MMQAError:
        pass


def collect(errors: list):
    return lambda where, error: errors.append((where, error))


@FUZZ
@given(lines=st.lists(st.binary(max_size=60) | jsonl_objects.map(lambda o: json.dumps(o).encode()), max_size=8))
def test_jsonl_reader(root, lines):
    (root / "train.jsonl").write_bytes(b"\n".join(lines))
    loads_or_refuses(lambda: JsonlReader(root).read("train"))
    skipped: list = []
    # skipping, the only errors left are about the whole file
    loads_or_refuses(lambda: JsonlReader(root).read("train", on_bad=collect(skipped)))
    assert all(isinstance(e, MMQAError) and str(e).startswith(where) for where, e in skipped)


@FUZZ
@given(data=st.binary(max_size=300))
def test_image_loader_on_random_bytes(data):
    loads_or_refuses(lambda: load_image(io.BytesIO(data)))


def image_bytes(mode: str, size: tuple[int, int], fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, "white" if mode in ("RGB", "L", "RGBA") else None).save(buf, format=fmt)
    return buf.getvalue()


# format -> modes it stores. Left out: palette BMP and YCbCr TIFF, which Pillow 12.3 writes but cannot
# read back ("image file is truncated"); such files are refused with a DataError like any unreadable one.
FORMATS = {
    "PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"],
    "JPEG": ["L", "RGB", "CMYK"],
    "TIFF": ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "F", "I;16"],
    "GIF": ["L", "P"],
    "BMP": ["1", "L", "RGB"],
    "WEBP": ["RGB", "RGBA"],
}
formats_and_modes = st.sampled_from(sorted(FORMATS)).flatmap(lambda f: st.tuples(st.just(f), st.sampled_from(FORMATS[f])))


@FUZZ
@given(fmt_mode=formats_and_modes, size=st.tuples(st.integers(1, 40), st.integers(1, 40)), cut=st.floats(0, 1))
def test_image_loader_on_real_images_whole_and_truncated(fmt_mode, size, cut):
    fmt, mode = fmt_mode
    data = image_bytes(mode, size, fmt)
    img = load_image(io.BytesIO(data))  # every mode of every format loads whole ...
    assert img.mode == "RGB" and img.size == size
    loads_or_refuses(lambda: load_image(io.BytesIO(data[: int(len(data) * cut)])))  # ... and cut short, loads or refuses


vqa_entry = st.fixed_dictionaries({}, optional={
    "question_id": st.integers(0, 3) | json_values, "image_id": st.integers(0, 3) | json_values,
    "question": st.text(max_size=6) | json_values, "answer_type": st.text(max_size=4) | json_values,
    "question_type": st.text(max_size=4) | json_values,
    "answers": st.lists(st.fixed_dictionaries({}, optional={"answer": st.text(max_size=4) | json_values}), max_size=3)
    | json_values,
})


@FUZZ
@given(questions=st.lists(vqa_entry, max_size=4) | json_values, annotations=st.lists(vqa_entry, max_size=4) | json_values,
       wrap=st.booleans())
def test_vqav2_reader(root, questions, annotations, wrap):
    q = {"questions": questions} if wrap else questions
    a = {"annotations": annotations} if wrap else annotations
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(q))
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(a))
    loads_or_refuses(lambda: VQAv2Reader(root).read("val"))
    loads_or_refuses(lambda: VQAv2Reader(root).read("val", on_bad=collect([])))


coco_image = st.fixed_dictionaries({}, optional={"id": st.integers(0, 3) | json_values,
                                                 "file_name": st.sampled_from(["a.png", "../a.png", "b.png"]) | json_values})
coco_caption = st.fixed_dictionaries({}, optional={"image_id": st.integers(0, 3) | json_values,
                                                   "caption": st.text(max_size=8) | json_values})


@FUZZ
@given(images=st.lists(coco_image, max_size=4) | json_values, annotations=st.lists(coco_caption, max_size=4) | json_values,
       raw=st.none() | st.binary(max_size=40))
def test_coco_captions_reader(root, images, annotations, raw):
    path = root / "annotations" / "captions_val2017.json"
    path.parent.mkdir(exist_ok=True)
    if raw is None:
        path.write_text(json.dumps({"images": images, "annotations": annotations}))
    else:
        path.write_bytes(raw)
    loads_or_refuses(lambda: CocoCaptionsReader(root).read("val"))
    loads_or_refuses(lambda: CocoCaptionsReader(root).read("val", on_bad=collect([])))
