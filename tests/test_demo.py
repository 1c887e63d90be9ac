"""The Gradio demo end to end: a tiny trained bundle served by the real `build_demo` on a local port
and called through `gradio_client` (answers, captions and search results equal `Bundle`'s, bad input
gives our messages), the Search tab's gallery and index choices, plus `demo.py`'s exit (code 2, and
what to do) when there is no bundle or no gallery to serve."""

from __future__ import annotations

import copy
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from conftest import ROOT, compose_cfg
from mmqa.app import build_demo
from mmqa.app.ui import MAX_QUESTION_CHARS, N_EXAMPLES, SEARCH_K, shapes_dataset, shapes_examples
from mmqa.bundle import Bundle
from mmqa.retrieval import INDEX_DIR, INDEX_JSON, ImageIndex, bundle_model_id
from mmqa.train import train

QUESTION = "what colour is the circle?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_bundle(data_dir: Path, out: Path, *overrides: str) -> Bundle:
    train(compose_cfg(data_dir, out, overrides))
    return Bundle.load(out / "bundle")


@pytest.fixture(scope="module")
def served(tmp_path_factory, data_dir):
    """(bundle, client, test image): a tiny cross-fusion bundle behind the real demo."""
    bundle = tiny_bundle(data_dir, tmp_path_factory.mktemp("runs") / "cross")
    demo = build_demo(bundle)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False, analytics_enabled=False,
                    download_files=tmp_path_factory.mktemp("downloads"))
    image = sorted((data_dir / "shapes").glob("shapes-*/images/test_*.png"))[0]
    yield bundle, client, image
    client.close()
    demo.close()


def test_answer_endpoint_gives_the_bundles_answer_and_a_heatmap(served):
    bundle, client, image = served
    answer, top, heatmap, note = client.predict(handle_file(image), QUESTION, api_name="/answer")
    expected = bundle.answer(image, QUESTION)
    assert answer == expected.answer and answer in bundle.answers
    assert [c["label"] for c in top["confidences"]] == [a for a, _ in expected.top]
    assert Image.open(heatmap).size == Image.open(image).size  # cross fusion has patch attention
    assert note == ""


def test_caption_endpoint_defaults_to_greedy_like_the_bundle(served):
    bundle, client, image = served
    caption = client.predict(handle_file(image), api_name="/caption")
    assert isinstance(caption, str) and caption.strip()
    assert caption == bundle.caption(image)
    beams = client.predict(handle_file(image), "beam search", 2, api_name="/caption")
    assert beams == bundle.caption(image, num_beams=2)
    sampled = client.predict(handle_file(image), "sampling", api_name="/caption")
    assert isinstance(sampled, str)


def test_a_fusion_without_attention_shows_the_image_and_says_why(data_dir, tmp_path):
    late = tiny_bundle(data_dir, tmp_path / "late", "model/fusion=late")
    image = sorted((data_dir / "shapes").glob("shapes-*/images/test_*.png"))[0]
    answer, _, shown, note = build_demo(late)(str(image), QUESTION, api_name="answer")  # called without a server
    assert answer == late.answer(image, QUESTION).answer
    assert Image.open(shown).size == Image.open(image).size
    assert "LateFusion has no patch attention" in note


@pytest.mark.parametrize(("image", "question", "message"), [
    (True, "", "The question is empty"),
    (True, "   ", "The question is empty"),
    (True, "x" * (MAX_QUESTION_CHARS + 1), f"the limit is {MAX_QUESTION_CHARS}"),
    (False, QUESTION, "No image"),
])
def test_bad_input_is_a_clear_error(served, image, question, message):
    _, client, path = served
    with pytest.raises(AppError, match=message):
        client.predict(handle_file(path) if image else None, question, api_name="/answer")


def test_examples_are_test_images_of_the_bundles_own_dataset(served, tmp_path):
    bundle, _, _ = served
    examples = shapes_examples(bundle.cfg)
    assert len(examples) == N_EXAMPLES
    assert all(Path(image).is_file() and "/images/test_" in image and question for image, question in examples)
    other = copy.deepcopy(bundle.cfg)
    other.data.reader.n_test += 1  # a dataset that was never generated
    assert shapes_examples(other) == []
    other.data.reader.root = str(tmp_path)
    assert shapes_examples(other) == []


def scores(results: list[dict]) -> list[float]:
    """The scores in the captions of a Gallery output ({"image": path, "caption": "0.873 · name.png"})."""
    return [float(r["caption"].split(" · ")[0]) for r in results]


def names(results: list[dict]) -> list[str]:
    return [r["caption"].split(" · ")[1] for r in results]


def test_search_text_endpoint_returns_k_images_ranked_like_the_bundle(served):
    bundle, client, _ = served
    results = client.predict("a red circle", 3, api_name="/search_text")
    assert len(results) == 3 and all(Image.open(r["image"]).size == (32, 32) for r in results)
    gallery = sorted((shapes_dataset(bundle.cfg) / "images").glob("test_*.png"))
    cosines = (bundle.embed_image(gallery) @ bundle.embed_text(["a red circle"])[0]).tolist()  # (N,)
    ranked = sorted(zip(cosines, (p.name for p in gallery)), reverse=True)[:3]
    assert names(results) == [name for _, name in ranked]
    assert scores(results) == pytest.approx([c for c, _ in ranked], abs=1e-3)  # captions keep 3 decimals
    assert len(client.predict("a red circle", api_name="/search_text")) == SEARCH_K  # the slider's default


def test_search_image_endpoint_finds_the_query_image_first(served):
    _, client, image = served
    results = client.predict(handle_file(image), 4, api_name="/search_image")
    assert len(results) == 4 and names(results)[0] == image.name
    assert scores(results)[0] == pytest.approx(1.0, abs=1e-3)
    assert scores(results) == sorted(scores(results), reverse=True)


@pytest.mark.parametrize(("api_name", "query", "message"), [
    ("/search_text", "", "The search text is empty"),
    ("/search_text", "x" * (MAX_QUESTION_CHARS + 1), f"the limit is {MAX_QUESTION_CHARS}"),
    ("/search_image", None, "No image"),
])
def test_bad_search_input_is_a_clear_error(served, api_name, query, message):
    _, client, _ = served
    with pytest.raises(AppError, match=message):
        client.predict(query, 3, api_name=api_name)


def test_gallery_folder_and_saved_index_choices(served, tmp_path):
    bundle, _, image = served
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, src in enumerate(sorted(image.parent.glob("test_*.png"))[:3]):
        Image.open(src).save(folder / "sub" / f"p{i}.jpg" if i else folder / f"p{i}.png")
    results = build_demo(bundle, gallery=folder)(str(folder / "p0.png"), 2, api_name="search_image")  # no server
    assert names(results)[0] == "p0.png" and len(results) == 2
    saved = ImageIndex.load(folder / INDEX_DIR)  # kept beside the gallery for the next start
    assert len(saved) == 3 and saved.model_id == bundle_model_id(bundle)

    # an index alone (as `python -m mmqa.index build --out` writes it) is searched over the files it lists
    moved = tmp_path / "elsewhere"
    (folder / INDEX_DIR).rename(moved)
    again = build_demo(bundle, index_dir=moved)(str(folder / "p0.png"), 2, api_name="search_image")
    assert names(again) == names(results)
    assert (moved / INDEX_JSON).is_file() and not (folder / INDEX_DIR).exists()


def test_without_a_gallery_the_search_tab_says_how_to_get_one(served):
    bundle, _, _ = served
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
    bundle, _, _ = served
    bundle_dir = bundle.save(tmp_path / "bundle")
    assert demo_py().main(["--bundle", str(bundle_dir), "--gallery", str(tmp_path / "nowhere")]) == 2
    assert f"{tmp_path / 'nowhere'}: not a folder of images" in capsys.readouterr().err
