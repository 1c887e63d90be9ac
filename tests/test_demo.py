"""The Gradio demo end to end: a tiny trained bundle served by the real `build_demo` and `launch` on a
local port and called through `gradio_client` (answers, captions — streamed word by word — and search
results equal `Bundle`'s; images in every format a person sends are accepted, bad input and oversized
images give our messages), the Search tab's gallery and index choices and a real (tiny, saved) open_clip
model loaded by path, plus `demo.py`: its exit (code 2, and what to do) when there is no bundle or no
gallery to serve, and `--train-if-missing`."""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from conftest import ROOT, compose_cfg
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from mmqa.app import build_demo, launch
from mmqa.app.inputs import MAX_SIDE, MAX_TEXT_CHARS
from mmqa.app.serve import CONCURRENCY, QUEUE_SIZE
from mmqa.app.ui import N_EXAMPLES, SEARCH_K, builtin_dataset, builtin_examples
from mmqa.inspect.maps import explain
from mmqa.bundle import Bundle
from mmqa.errors import MMQAError
from mmqa.image_index import INDEX_DIR, INDEX_JSON, ImageIndex, bundle_model_id
from mmqa.text_generation import stream_text
from mmqa.train import train

QUESTION = "what colour is the circle?"
TEST_MAX_PIXELS = 40_000_000  # the served demo's pixel limit here (the default is larger)
TEST_MAX_FILE_SIZE = "5mb"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_bundle(data_dir: Path, out: Path, *overrides: str) -> Bundle:
    train(compose_cfg(data_dir, out, overrides))
    return Bundle.load(out / "bundle")


def session_bundle(data_dir: Path) -> Bundle:
    """A fresh `Bundle` object of one tiny cross-fusion bundle trained once per test session (beside
    the session's dataset), so every demo test file serves the same model without training again."""
    out = data_dir.parent / "demo-cross"
    if not (out / "bundle" / "model.safetensors").is_file():
        train(compose_cfg(data_dir, out, ()))
    return Bundle.load(out / "bundle")


def shapes_test_images(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "shapes").glob("shapes-*/images/test_*.png"))


def serve(demo: gr.Blocks, **limits) -> str:
    """Launch `demo` through `mmqa.app.launch` on a free local port; its URL."""
    port = free_port()
    launch(demo, port=port, prevent_thread_lock=True, quiet=True, **limits)
    return f"http://127.0.0.1:{port}/"


def client_of(url: str, downloads: Path) -> Client:
    return Client(url, verbose=False, analytics_enabled=False, download_files=downloads)


@pytest.fixture(scope="module")
def served(tmp_path_factory, data_dir):
    """(bundle, client, test image): a tiny cross-fusion bundle behind the real demo."""
    bundle = session_bundle(data_dir)
    demo = build_demo(bundle, max_pixels=TEST_MAX_PIXELS)
    client = client_of(serve(demo, max_file_size=TEST_MAX_FILE_SIZE), tmp_path_factory.mktemp("downloads"))
    yield bundle, client, shapes_test_images(data_dir)[0], demo
    client.close()
    demo.close()


def test_answer_endpoint_gives_the_bundles_answer_and_a_heatmap(served):
    bundle, client, image, _ = served
    answer, unknown, top, heatmap, note = client.predict(handle_file(image), QUESTION, api_name="/answer")
    expected = bundle.answer(image, QUESTION)
    assert answer == expected.answer and answer in bundle.answers
    assert unknown == "" and expected.unknown == []  # every word of the question was in training
    assert [c["label"] for c in top["confidences"]] == [a for a, _ in expected.top]
    assert Image.open(heatmap).size == Image.open(image).size  # cross fusion has patch attention
    assert note == ""


def test_words_the_model_never_saw_are_named_by_the_endpoint_and_the_bundle(served):
    bundle, client, image, _ = served
    question = "please tell me what colour the circle is"  # "please", "tell", "me": never in the shapes world
    answer, unknown, top, _, _ = client.predict(handle_file(image), question, api_name="/answer")
    expected = bundle.answer(image, question)
    assert expected.unknown == ["please", "tell", "me"]
    assert unknown == "please, tell, me"
    assert answer == expected.answer and len(top["confidences"]) == 5  # still answered, with its top 5


def test_inspect_endpoint_shows_the_chosen_layer_and_head(served):
    bundle, client, image, _ = served
    ex = explain(bundle, Image.open(image), QUESTION)
    site = next(iter(ex.question))  # the first fusion layer's question -> patch attention
    answer, heatmap, note = client.predict(handle_file(image), QUESTION, site, "1", api_name="/inspect")
    assert answer.startswith(ex.answer) and note == ""
    assert Image.open(heatmap).size == Image.open(image).size
    with pytest.raises(AppError, match=r"head '9': .* has heads 0 to \d+, or 'mean'"):
        client.predict(handle_file(image), QUESTION, site, "9", api_name="/inspect")
    with pytest.raises(AppError, match=r"no map 'fusion/nowhere' in this model; valid: fusion/text_blocks.0/cross"):
        client.predict(handle_file(image), QUESTION, "fusion/nowhere", "mean", api_name="/inspect")


def test_caption_endpoint_defaults_to_greedy_like_the_bundle(served):
    bundle, client, image, _ = served
    caption = client.predict(handle_file(image), api_name="/caption")
    assert isinstance(caption, str) and caption.strip()
    assert caption == bundle.caption(image)
    job = client.submit(handle_file(image), api_name="/caption")
    assert job.result() == caption
    steps = job.outputs()  # every value the page showed: the caption growing word by word
    assert len(steps) >= len(caption.split()) >= 2 and steps[-1] == caption
    assert all(later.startswith(earlier.strip()) for earlier, later in zip(steps, steps[1:]))
    beams = client.predict(handle_file(image), "beam search", 2, api_name="/caption")
    assert beams == bundle.caption(image, num_beams=2)
    sampled = client.predict(handle_file(image), "sampling", api_name="/caption")
    assert isinstance(sampled, str)


def test_an_error_while_streaming_reaches_the_caller_instead_of_hanging(served):
    bundle, *_ = served

    def fails_midway(streamer):
        streamer.put(torch.tensor([bundle.decoder_tokenizer.bos_token_id]))  # the prompt, skipped
        raise MMQAError("the decoder broke")

    with pytest.raises(MMQAError, match="the decoder broke"):
        list(stream_text(fails_midway, bundle.decoder_tokenizer))


def test_a_fusion_without_attention_shows_the_image_and_says_why(data_dir, tmp_path):
    late = tiny_bundle(data_dir, tmp_path / "late", "model/fusion=late")
    image = sorted((data_dir / "shapes").glob("shapes-*/images/test_*.png"))[0]
    answer, _, _, shown, note = build_demo(late)(str(image), QUESTION, api_name="answer")  # called without a server
    assert answer == late.answer(image, QUESTION).answer
    assert Image.open(shown).size == Image.open(image).size
    assert "LateFusion has no patch attention" in note


@pytest.mark.parametrize(("image", "question", "message"), [
    (True, "", "The question is empty"),
    (True, "   ", "The question is empty"),
    (True, "x" * (MAX_TEXT_CHARS + 1), f"the limit is {MAX_TEXT_CHARS}"),
    (False, QUESTION, "No image"),
])
def test_bad_input_is_a_clear_error(served, image, question, message):
    _, client, path, _ = served
    with pytest.raises(AppError, match=message):
        client.predict(handle_file(path) if image else None, question, api_name="/answer")


def exif_rotated(image: Image.Image) -> Image.Image:
    """The image stored turned a quarter to the left, with EXIF orientation 6 saying "turn it back"."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the viewer rotates 90° clockwise
    image = image.transpose(Image.Transpose.ROTATE_90)
    image.info["exif"] = exif.tobytes()
    return image


def photo_formats(src: Path, folder: Path) -> dict[str, Path]:
    """The test image as a person might send it: each file format and pixel mode the demo accepts."""
    rgb = Image.open(src).convert("RGB").resize((48, 40))  # not square, so a rotation shows in the size
    sixteen = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)  # (H, W) full 16-bit range
    made = {
        "rgb.png": rgb,
        "photo.jpg": rgb,
        "photo.webp": rgb,
        "grey.png": rgb.convert("L"),
        "alpha.png": rgb.convert("RGBA"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "sixteen_bit.png": Image.fromarray(sixteen),
        "palette.png": rgb.convert("P"),
    }
    paths = {}
    for name, image in made.items():
        image.save(folder / name)
        paths[name] = folder / name
    rotated = exif_rotated(rgb)
    rotated.save(folder / "rotated.jpg", exif=rotated.info["exif"])
    paths["rotated.jpg"] = folder / "rotated.jpg"
    return paths


def test_every_image_format_a_person_sends_is_answered_like_the_bundle(served, tmp_path):
    bundle, client, image, _ = served
    for name, path in photo_formats(image, tmp_path).items():
        answer, _, top, heatmap, _ = client.predict(handle_file(path), QUESTION, api_name="/answer")
        expected = bundle.answer(path, QUESTION)  # Bundle reads the file itself: same conversion
        assert answer == expected.answer, name
        assert [c["confidence"] for c in top["confidences"]] == pytest.approx([p for _, p in expected.top], abs=1e-4)
        assert Image.open(heatmap).size == (48, 40), name  # upright: the rotated one was turned back
    assert Image.open(tmp_path / "rotated.jpg").size == (40, 48)  # as stored


def test_a_very_large_photo_is_accepted_and_scaled_down(served, tmp_path):
    bundle, client, *_ = served
    ramp = np.linspace(0, 255, 6000, dtype=np.float32)  # smooth: a 24 MP JPEG of a few hundred KB
    pixels = np.stack([np.broadcast_to(ramp, (4000, 6000)), np.broadcast_to(ramp[:4000, None], (4000, 6000)),
                       np.full((4000, 6000), 128, np.float32)], axis=-1).astype(np.uint8)  # (H, W, 3)
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=80)
    answer, _, _, heatmap, _ = client.predict(handle_file(tmp_path / "big.jpg"), QUESTION, api_name="/answer")
    assert answer in bundle.answers
    assert Image.open(heatmap).size == (MAX_SIDE, round(MAX_SIDE * 4000 / 6000))  # aspect ratio kept


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height grey pixels but holds a few bytes of data: decoding it would
    fail (truncated), so a refusal that names the pixel count shows the size was checked first."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write_bad_file(path: Path, good_png: Path) -> None:
    """The file `path.name` names: text, nothing, a real PNG bomb, PNG headers claiming huge sizes, a
    PNG cut short."""
    made = {
        "notes.png": lambda: b"this is text, not a picture",
        "empty.jpg": lambda: b"",
        "header.png": lambda: png_header_only(7000, 7000),
        "huge.png": lambda: png_header_only(100_000, 100_000),  # past Pillow's own limit too
        "truncated.png": lambda: good_png.read_bytes()[:-40],
    }
    if path.name == "bomb.png":  # a real PNG of 81 MP of black: 80 kB on disk, 81 MB decoded
        Image.new("L", (9000, 9000)).save(path)
    else:
        path.write_bytes(made[path.name]())


@pytest.mark.parametrize(("name", "message"), [
    ("notes.png", "The file is not an image this demo can read"),
    ("empty.jpg", "The file is not an image this demo can read"),
    ("bomb.png", f"9000×9000 = 81,000,000 pixels, over the limit of {TEST_MAX_PIXELS:,}"),
    ("header.png", f"49,000,000 pixels, over the limit of {TEST_MAX_PIXELS:,}"),
    ("huge.png", f"over the limit of {TEST_MAX_PIXELS:,} pixels"),
    ("truncated.png", "The image could not be decoded"),
])
def test_a_file_that_is_no_usable_image_is_refused_with_a_clear_message(served, tmp_path, name, message):
    _, client, image, _ = served
    write_bad_file(tmp_path / name, image)
    for api_name, args in (("/answer", (QUESTION,)), ("/caption", ()), ("/search_image", (3,))):
        with pytest.raises(AppError, match=message) as refused:
            client.predict(handle_file(tmp_path / name), *args, api_name=api_name)
        assert "Traceback" not in str(refused.value)


def test_an_upload_over_the_size_limit_is_refused_by_the_server(served, tmp_path):
    import httpx

    _, client, *_ = served
    upload = f"{client.src.rstrip('/')}/gradio_api/upload"
    big = httpx.post(upload, files={"files": ("big.png", b"\0" * (5 * 2**20 + 1))})
    assert big.status_code == 413 and "maximum allowed size" in big.text
    assert httpx.post(upload, files={"files": ("small.png", b"\0" * 1000)}).status_code == 200


def test_examples_are_test_images_of_the_bundles_own_dataset(served, tmp_path):
    bundle, *_ = served
    examples = builtin_examples(bundle.cfg)
    assert len(examples) == N_EXAMPLES
    assert all(Path(image).is_file() and "/images/test_" in image and question for image, question in examples)
    other = copy.deepcopy(bundle.cfg)
    other.data.reader.n_test += 1  # a dataset that was never generated
    assert builtin_examples(other) == []
    other.data.reader.root = str(tmp_path)
    assert builtin_examples(other) == []


def scores(results: list[dict]) -> list[float]:
    """The scores in the captions of a Gallery output ({"image": path, "caption": "0.873 · name.png"})."""
    return [float(r["caption"].split(" · ")[0]) for r in results]


def names(results: list[dict]) -> list[str]:
    return [r["caption"].split(" · ")[1] for r in results]


def test_search_text_endpoint_returns_k_images_ranked_like_the_bundle(served):
    bundle, client, *_ = served
    results = client.predict("a red circle", 3, api_name="/search_text")
    assert len(results) == 3 and all(Image.open(r["image"]).size == (32, 32) for r in results)
    gallery = sorted((builtin_dataset(bundle.cfg) / "images").glob("test_*.png"))
    cosines = (bundle.embed_image(gallery) @ bundle.embed_text(["a red circle"])[0]).tolist()  # (N,)
    ranked = sorted(zip(cosines, (p.name for p in gallery)), reverse=True)[:3]
    assert names(results) == [name for _, name in ranked]
    assert scores(results) == pytest.approx([c for c, _ in ranked], abs=1e-3)  # captions keep 3 decimals
    assert len(client.predict("a red circle", api_name="/search_text")) == SEARCH_K  # the slider's default


def test_search_image_endpoint_finds_the_query_image_first(served):
    _, client, image, _ = served
    results = client.predict(handle_file(image), 4, api_name="/search_image")
    assert len(results) == 4 and names(results)[0] == image.name
    assert scores(results)[0] == pytest.approx(1.0, abs=1e-3)
    assert scores(results) == sorted(scores(results), reverse=True)


@pytest.mark.parametrize(("api_name", "query", "message"), [
    ("/search_text", "", "The search text is empty"),
    ("/search_text", "x" * (MAX_TEXT_CHARS + 1), f"the limit is {MAX_TEXT_CHARS}"),
    ("/search_image", None, "No image"),
])
def test_bad_search_input_is_a_clear_error(served, api_name, query, message):
    _, client, *_ = served
    with pytest.raises(AppError, match=message):
        client.predict(query, 3, api_name=api_name)


def test_gallery_folder_and_saved_index_choices(served, tmp_path):
    bundle, _, image, _ = served
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, src in enumerate(sorted(image.parent.glob("test_*.png"))[:3]):
        Image.open(src).save(folder / "sub" / f"p{i}.jpg" if i else folder / f"p{i}.png")
    results = build_demo(bundle, gallery=folder)(str(folder / "p0.png"), 2, api_name="search_image")  # no server
    assert names(results)[0] == "p0.png" and len(results) == 2
    saved = ImageIndex.load(folder / INDEX_DIR)  # kept beside the gallery for the next start
    assert len(saved) == 3 and saved.model_id == bundle_model_id(bundle)

    # an index alone (as `python -m mmqa index build --out` writes it) is searched over the files it lists
    moved = tmp_path / "elsewhere"
    (folder / INDEX_DIR).rename(moved)
    again = build_demo(bundle, index_dir=moved)(str(folder / "p0.png"), 2, api_name="search_image")
    assert names(again) == names(results)
    assert (moved / INDEX_JSON).is_file() and not (folder / INDEX_DIR).exists()


def test_without_a_gallery_the_search_tab_says_how_to_get_one(served):
    bundle, *_ = served
    other = copy.deepcopy(bundle.cfg)
    other.data.reader.n_test += 1  # a dataset that was never generated: no default gallery
    demo = build_demo(Bundle(other, bundle.model, bundle.text_tokenizer, bundle.decoder_tokenizer, bundle.answers))
    with pytest.raises(gr.Error, match="no gallery to search: start the demo with `--gallery DIR`"):
        demo("a red circle", 3, api_name="search_text")


def test_demo_py_with_a_missing_bundle_says_how_to_train_one(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--bundle", "/nonexistent"], cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "/nonexistent is not an mmqa bundle" in proc.stderr
    assert "python train.py" in proc.stderr and "make train" in proc.stderr
    assert "Traceback" not in proc.stderr


def demo_py():
    """demo.py as a module, to call its main in-process: no second start-up."""
    spec = importlib.util.spec_from_file_location("demo", ROOT / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


def test_demo_py_finds_no_bundle_in_an_empty_folder(tmp_path, monkeypatch, capsys):
    demo = demo_py()
    monkeypatch.chdir(tmp_path)  # no outputs/train/runs here
    assert demo.main([]) == 2
    err = capsys.readouterr().err
    assert "No trained bundle" in err and "python train.py" in err and "make train" in err


def test_demo_py_with_a_gallery_that_is_no_folder_says_so(served, tmp_path, capsys):
    bundle, *_ = served
    bundle_dir = bundle.save(tmp_path / "bundle")
    assert demo_py().main(["--bundle", str(bundle_dir), "--gallery", str(tmp_path / "nowhere")]) == 2
    assert f"{tmp_path / 'nowhere'}: not a folder of images" in capsys.readouterr().err


def test_the_served_demo_is_bounded_and_local(served):
    demo = served[3]
    assert demo.server_name == "127.0.0.1" and not demo.share
    assert demo._queue.max_size == QUEUE_SIZE and demo._queue.default_concurrency_limit == CONCURRENCY
    assert demo.max_file_size == 5 * 2**20
    with pytest.raises(MMQAError, match="max_pixels must be between 1 and"):  # past what Pillow opens
        build_demo(served[0], max_pixels=10**12)


class Launched:
    """Stands in for `mmqa.app.launch` in demo.py: records what would have been served, serves nothing."""

    def __init__(self):
        self.calls: list[tuple[gr.Blocks, dict]] = []

    def __call__(self, demo: gr.Blocks, **kwargs):
        self.calls.append((demo, kwargs))


def test_train_if_missing_trains_the_default_model_then_serves_it(served, tmp_path, monkeypatch, capsys):
    bundle, _, image, _ = served
    demo = demo_py()
    monkeypatch.chdir(tmp_path)  # no outputs/train/runs here
    trained: list[list[str]] = []

    def fake_train(cmd, **kwargs):  # `python train.py` as it ends: a bundle under outputs/train/runs
        trained.append(cmd)
        bundle.save(tmp_path / "outputs/train/runs/2026-01-01_00-00-00/bundle")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(demo.subprocess, "run", fake_train)
    monkeypatch.setattr(demo, "launch", launched := Launched())
    assert demo.main(["--train-if-missing"]) == 0
    assert trained == [[sys.executable, str(ROOT / "train.py")]]
    assert "training the default model (`python train.py`)" in capsys.readouterr().out
    (page, kwargs), = launched.calls
    assert kwargs["host"] == "127.0.0.1" and kwargs["share"] is False  # the defaults: local, no public link
    assert page(str(image), QUESTION, api_name="answer")[0] == bundle.answer(image, QUESTION).answer

    assert demo.main(["--train-if-missing"]) == 0 and len(trained) == 1  # a bundle exists now: no training
    monkeypatch.chdir(tmp_path / "outputs")  # no bundle here again; now training fails
    monkeypatch.setattr(demo.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1))
    assert demo.main(["--train-if-missing"]) == 2
    assert "Training failed (exit code 1)" in capsys.readouterr().err
    assert len(launched.calls) == 2


def test_demo_py_searches_with_an_open_clip_model_loaded_by_path(served, tmp_path, monkeypatch):
    from test_retrieval import save_tiny_clip

    from mmqa.image_index import open_clip_towers

    bundle, _, image, _ = served
    folder = tmp_path / "photos"
    folder.mkdir()
    for src in sorted(image.parent.glob("test_*.png"))[:4]:
        shutil.copy(src, folder)
    config, weights, _ = save_tiny_clip(tmp_path / "clip")
    demo = demo_py()
    monkeypatch.setattr(demo, "launch", launched := Launched())
    bundle_dir = str(bundle.save(tmp_path / "bundle"))
    clip_args = ["--clip", str(config), "--clip-pretrained", str(weights)]
    assert demo.main(["--bundle", bundle_dir, "--gallery", str(folder), *clip_args]) == 0
    page = launched.calls[-1][0]
    towers = open_clip_towers(str(config), str(weights))
    assert ImageIndex.load(folder / INDEX_DIR).model_id == towers.model_id  # indexed by the CLIP
    results = page("a red circle", 4, api_name="search_text")
    cosines = (towers.embed_image(sorted(folder.glob("*.png"))) @ towers.embed_text(["a red circle"])[0]).tolist()
    assert scores(results) == pytest.approx(sorted(cosines, reverse=True), abs=1e-3)
    assert names(page(str(folder / image.name), 1, api_name="search_image")) == [image.name]

    assert demo.main(["--bundle", bundle_dir, "--gallery", str(folder)]) == 0  # back to the bundle's towers
    assert ImageIndex.load(folder / INDEX_DIR).model_id == bundle_model_id(bundle)  # the stale index was rebuilt
    with pytest.raises(SystemExit):
        demo.main(["--bundle", bundle_dir, "--clip", "ViT-B-32"])  # a CLIP needs its weights
    assert demo.main(["--bundle", bundle_dir, "--clip", str(config), "--clip-pretrained",
                      str(tmp_path / "none.safetensors")]) == 2
