"""The Gradio UI around one `Bundle`: an Ask tab (answer, top-5 answers, attention heatmap) and a
Describe tab (a caption, with a choice of decoding). Thin on purpose: each handler checks its input,
calls one Bundle method and turns the result into something to display; no model logic lives here.

Both handlers are API endpoints too (`/answer`, `/caption`), so `gradio_client` gets the same answers
as the page and as `Bundle` itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from omegaconf import DictConfig
from PIL import Image

from mmqa.bundle import Bundle
from mmqa.errors import MMQAError

MAX_QUESTION_CHARS = 200  # longer questions are refused: the text encoder truncates them anyway
TOP_K = 5  # answers shown with their probabilities
N_EXAMPLES = 4  # test images of the built-in dataset offered as examples
HEATMAP_ALPHA = 0.5  # weight of the heatmap when blended over the image
COLORMAP = "inferno"
DECODINGS = ("greedy", "beam search", "sampling")


def build_demo(bundle: Bundle) -> gr.Blocks:
    """The whole page; launch it with `build_demo(bundle).queue().launch()`."""
    fusion = bundle.cfg.model.fusion._target_.rsplit(".", 1)[-1]
    examples = shapes_examples(bundle.cfg)

    def answer(image: Image.Image | None, question: str | None):
        check_image(image)
        question = check_question(question)
        try:
            result = bundle.answer(image, question, top_k=TOP_K, return_attention=True)
        except MMQAError as e:
            raise gr.Error(str(e), print_exception=False) from None
        if result.attention is None:
            return result.answer, dict(result.top), image, f"{fusion} has no patch attention: no heatmap to show."
        return result.answer, dict(result.top), overlay_attention(image, result.attention), ""

    def caption(image: Image.Image | None, decoding: str, num_beams: int, temperature: float, top_k: int,
                top_p: float, max_new_tokens: int) -> str:
        check_image(image)
        kwargs = decoding_kwargs(decoding, num_beams, temperature, top_k, top_p, max_new_tokens)
        try:
            return bundle.caption(image, **kwargs)
        except MMQAError as e:
            raise gr.Error(str(e), print_exception=False) from None

    with gr.Blocks(title="mmqa", analytics_enabled=False) as demo:  # offline by default: no telemetry
        gr.Markdown(f"# mmqa\nAsk about an image, or have it described. Model: {fusion}, "
                    f"{len(bundle.answers)} possible answers.")
        with gr.Tabs():
            with gr.Tab("Ask"):
                with gr.Row():
                    with gr.Column():
                        ask_image = gr.Image(type="pil", label="Image")
                        question = gr.Textbox(label="Question", placeholder="what colour is the circle?",
                                              max_length=MAX_QUESTION_CHARS)
                        ask = gr.Button("Ask", variant="primary")
                    with gr.Column():
                        answer_box = gr.Textbox(label="Answer")
                        top = gr.Label(num_top_classes=TOP_K, label=f"Top {TOP_K} answers")
                        heatmap = gr.Image(type="pil", format="png", label="Where the question looked")
                        note = gr.Markdown(label="Note")
                if examples:
                    gr.Examples(examples, [ask_image, question], cache_examples=False)
                outputs = [answer_box, top, heatmap, note]
                ask.click(answer, [ask_image, question], outputs, api_name="answer")
                question.submit(answer, [ask_image, question], outputs, api_visibility="private")

            with gr.Tab("Describe"):
                gen = bundle.cfg.generation
                with gr.Row():
                    with gr.Column():
                        describe_image = gr.Image(type="pil", label="Image")
                        decoding = gr.Radio(list(DECODINGS), value="greedy", label="Decoding")
                        num_beams = gr.Slider(2, 8, value=3, step=1, label="Beams", visible=False)
                        with gr.Row(visible=False) as sampling:
                            temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="Temperature")
                            top_k = gr.Slider(0, 100, value=50, step=1, label="Top-k (0: off)")
                            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                        max_new = gr.Slider(1, max(bundle.cfg.data.max_caption_length, gen.max_new_tokens),
                                            value=gen.max_new_tokens, step=1, label="Max new tokens")
                        describe = gr.Button("Describe", variant="primary")
                    caption_box = gr.Textbox(label="Caption")
                if examples:
                    gr.Examples([e[:1] for e in examples], [describe_image], cache_examples=False)
                decoding.change(
                    lambda d: (gr.update(visible=d == "beam search"), gr.update(visible=d == "sampling")),
                    decoding, [num_beams, sampling], api_visibility="private",
                )
                describe.click(caption, [describe_image, decoding, num_beams, temperature, top_k, top_p, max_new],
                               caption_box, api_name="caption")
    return demo


def check_image(image: Image.Image | None) -> None:
    if image is None:
        raise gr.Error("No image: upload one (or pick an example) first.", print_exception=False)


def check_question(question: str | None) -> str:
    question = (question or "").strip()
    if not question:
        raise gr.Error("The question is empty: type a question about the image.", print_exception=False)
    if len(question) > MAX_QUESTION_CHARS:
        raise gr.Error(f"The question is {len(question)} characters long; the limit is {MAX_QUESTION_CHARS}.",
                       print_exception=False)
    return question


def decoding_kwargs(decoding: str, num_beams: int, temperature: float, top_k: int, top_p: float,
                    max_new_tokens: int) -> dict:
    """The Describe tab's controls -> transformers `generate` options; only the chosen mode's apply."""
    kwargs = {"max_new_tokens": int(max_new_tokens), "num_beams": 1, "do_sample": False}
    if decoding == "beam search":
        kwargs["num_beams"] = int(num_beams)
    elif decoding == "sampling":
        kwargs.update(do_sample=True, temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    elif decoding != "greedy":
        raise gr.Error(f"Unknown decoding {decoding!r}: choose one of {', '.join(DECODINGS)}.", print_exception=False)
    return kwargs


def overlay_attention(image: Image.Image, attention: torch.Tensor) -> Image.Image:
    """A (grid, grid) attention map, stretched over the whole image as the model's resize stretches
    the image, normalised to [0, 1], coloured and blended over the image."""
    a = F.interpolate(attention.float()[None, None], size=(image.height, image.width), mode="bilinear")[0, 0]  # (H, W)
    a = (a - a.min()) / (a.max() - a.min()).clamp_min(1e-12)
    heat = colormaps[COLORMAP](a.numpy())[..., :3]  # (H, W, 3) in [0, 1]
    return Image.blend(image.convert("RGB"), Image.fromarray((heat * 255).astype(np.uint8)), HEATMAP_ALPHA)


def shapes_examples(cfg: DictConfig, n: int = N_EXAMPLES) -> list[list[str]]:
    """[image, question] pairs from the test split of the built-in shapes dataset this bundle was
    trained on, when it is on disk (the generator's parameters in `meta.json` equal the config's);
    [] for any other data, or when the dataset is not there."""
    reader = cfg.data.get("reader") or {}
    if reader.get("root") is None:
        return []
    for meta_file in sorted(Path(reader.root).glob("shapes-*/meta.json")):
        try:
            params = json.loads(meta_file.read_text())["params"]
            if all(reader.get(k) == v for k, v in params.items()):
                return _first_questions(meta_file.parent, n)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a complete dataset: offer no examples from it
    return []


def _first_questions(dataset: Path, n: int) -> list[list[str]]:
    """The first question of each of the first n test images."""
    examples: dict[str, str] = {}
    with open(dataset / "test.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if "question" in row and row["image"] not in examples:
                examples[row["image"]] = row["question"]
                if len(examples) == n:
                    break
    return [[str(dataset / image), q] for image, q in examples.items()]
