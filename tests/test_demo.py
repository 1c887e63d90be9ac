"""The Gradio demo end to end: a tiny trained bundle served by the real `build_demo` on a local port
and called through `gradio_client` (answers and captions equal `Bundle`'s, bad input gives our
messages), plus `demo.py`'s exit (code 2, how to train one) when there is no bundle to serve."""

from __future__ import annotations

import copy
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from conftest import ROOT, compose_cfg
from mmqa.app import build_demo
from mmqa.app.ui import MAX_QUESTION_CHARS, N_EXAMPLES, shapes_examples
from mmqa.bundle import Bundle
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


def test_demo_py_with_a_missing_bundle_says_how_to_train_one(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--bundle", "/nonexistent"], cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "/nonexistent is not an mmqa bundle" in proc.stderr
    assert "python train.py" in proc.stderr and "make train" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_py_finds_no_bundle_in_an_empty_folder(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("demo", ROOT / "demo.py")  # in-process: no second start-up
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    monkeypatch.chdir(tmp_path)  # no outputs/train/runs here
    assert demo.main([]) == 2
    err = capsys.readouterr().err
    assert "No trained bundle" in err and "python train.py" in err and "make train" in err
