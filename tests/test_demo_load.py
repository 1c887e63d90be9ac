"""The demo under load and abuse, served by the real `build_demo` + `launch` on a local port: 50
`gradio_client` clients at once, each with its own image and question, all get `Bundle.answer`'s answer
for their own input (no errors, no cross-talk); a full queue refuses more work at once instead of
growing; and no path a client names — as an image input or through the `/file=` route — reads a file
outside what was uploaded and the gallery."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from gradio_client import handle_file
from gradio_client.utils import QueueError
from test_demo import QUESTION, client_of, serve, session_bundle, shapes_test_images

from mmqa.app import build_demo

N_CLIENTS = 50
QUESTIONS = ("what colour is the circle?", "how many shapes are there?", "is there a red square?",
             "what shape is left of the blue circle?", "is the triangle bigger than the cross?")


@pytest.fixture(scope="module")
def served(data_dir):
    """(bundle, demo URL, demo): the session's tiny bundle behind the real demo with the default limits."""
    bundle = session_bundle(data_dir)
    demo = build_demo(bundle)
    url = serve(demo)
    yield bundle, url, demo
    demo.close()


def test_fifty_concurrent_clients_each_get_the_answer_to_their_own_question(served, data_dir, tmp_path):
    bundle, url, _ = served
    images = shapes_test_images(data_dir)
    asks = [(images[i % len(images)], QUESTIONS[i % len(QUESTIONS)]) for i in range(N_CLIENTS)]  # 40 distinct pairs
    start = threading.Barrier(N_CLIENTS)

    def one_user(i: int):
        image, question = asks[i]
        client = client_of(url, tmp_path / f"client{i}")
        try:
            start.wait()  # every client connected: the questions arrive together
            answer, _, top, _, _ = client.predict(handle_file(image), question, api_name="/answer")
            return answer, [(c["label"], c["confidence"]) for c in top["confidences"]]
        finally:
            client.close()

    with ThreadPoolExecutor(N_CLIENTS) as pool:
        got = list(pool.map(one_user, range(N_CLIENTS)))  # an error in any client is raised here
    for (image, question), (answer, top) in zip(asks, got):
        expected = bundle.answer(image, question)
        assert answer == expected.answer and answer in bundle.answers
        # the top-5 probabilities identify the input: another client's image or question would differ
        assert [a for a, _ in top] == [a for a, _ in expected.top]
        assert [p for _, p in top] == pytest.approx([p for _, p in expected.top], abs=1e-4)
    assert len({tuple(p for _, p in top) for _, top in got}) > len(QUESTIONS)  # the inputs really differ


def test_a_full_queue_refuses_more_work_at_once(served, data_dir, tmp_path, monkeypatch):
    bundle, _, _ = served
    queue_size = 3
    demo = build_demo(bundle)
    url = serve(demo, queue_size=queue_size, concurrency=1)
    running, release = threading.Event(), threading.Event()
    answer = bundle.answer

    def held_answer(*args, **kwargs):  # the first question holds the only worker until released
        running.set()
        assert release.wait(20)
        return answer(*args, **kwargs)

    monkeypatch.setattr(bundle, "answer", held_answer)
    image = shapes_test_images(data_dir)[0]
    client = client_of(url, tmp_path)
    try:
        first = client.submit(handle_file(image), QUESTION, api_name="/answer")
        assert running.wait(20)
        waiting = [client.submit(handle_file(image), QUESTION, api_name="/answer") for _ in range(queue_size)]
        while len(demo._queue) < queue_size:  # all of them waiting (their uploads take a moment)
            threading.Event().wait(0.05)
        with pytest.raises(QueueError, match="Queue is full"):
            client.predict(handle_file(image), QUESTION, api_name="/answer")
        release.set()
        expected = answer(image, QUESTION).answer
        assert [job.result(timeout=30)[0] for job in [first, *waiting]] == [expected] * (1 + queue_size)
    finally:
        release.set()
        client.close()
        demo.close()


def test_no_client_path_reads_a_file_outside_the_uploads_and_the_gallery(served, data_dir, tmp_path):
    bundle, url, _ = served
    api = url + "gradio_api"
    gallery_image = shapes_test_images(data_dir)[0]
    secret = tmp_path / "secret.png"  # an image on the server's disk, outside the gallery
    secret.write_bytes(gallery_image.read_bytes())
    bundle_config = data_dir.parent / "demo-cross" / "bundle" / "config.yaml"

    # the file route serves gallery images, and nothing else a client names
    assert httpx.get(f"{api}/file={gallery_image}").status_code == 200
    for path in ("/etc/passwd", secret, bundle_config, gallery_image.parent.parent / "test.jsonl",
                 f"{gallery_image.parent}/../test.jsonl", "/proc/self/environ"):
        refused = httpx.get(f"{api}/file={path}")
        assert refused.status_code == 403 and "File not allowed" in refused.text, path

    # an input file must be an upload (or a gallery image, readable anyway): a path the client makes
    # up is refused before any handler runs
    def ask(path) -> str:
        event = httpx.post(f"{api}/call/answer", json={
            "data": [{"path": str(path), "meta": {"_type": "gradio.FileData"}}, QUESTION]}).json()["event_id"]
        return httpx.get(f"{api}/call/answer/{event}", timeout=30).text

    for path in ("/etc/passwd", secret, bundle_config):
        stream = ask(path)
        assert "event: error" in stream and "root:x:0:0" not in stream and "Traceback" not in stream, path
    stream = ask(gallery_image)
    assert "event: complete" in stream and f'"{bundle.answer(gallery_image, QUESTION).answer}"' in stream
