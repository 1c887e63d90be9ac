"""The Gradio UI around one `Bundle`: an Ask tab (answer, the question's words new to the model, top-5
answers, attention heatmap), a Describe tab (a caption written word by word, with a choice of decoding; for a bundle trained on
recipes, the predicted ingredients with their probabilities and the recipe) and a Search tab (text ->
images and image -> images over a gallery, through `mmqa.image_index.ImageIndex`, embedded by the
bundle's contrastive towers or by a real open_clip model). Thin on purpose: each handler gets input
already checked (`mmqa.app.inputs`), calls Bundle / ImageIndex / Towers methods and turns the result
into something to display; no model logic lives here.

An Inspect tab shows any attention map of the model for the user's question (a layer and a head, or a
rollout: `mmqa.inspect.maps`). Every handler is an API endpoint too (`/answer`, `/caption`, `/inspect`,
`/search_text`, `/search_image`, and `/recipe` for a recipe bundle), so
`gradio_client` gets the same answers as the page and as `Bundle` itself. The handlers that run a model
share one concurrency group (`MODEL_GROUP`): the queue's concurrency limit (`mmqa.app.serve`, one by
default) bounds model calls across all tabs together (`Bundle` also tokenizes under a lock, so a
higher limit cannot mix a question's truncation length with a search text's).
"""

from __future__ import annotations

import json
import uuid
from functools import partial
from pathlib import Path

import gradio as gr
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from omegaconf import DictConfig
from PIL import Image

from mmqa.app.inputs import (
    MAX_PIXELS,
    MAX_TEXT_CHARS,
    check_image,
    check_text,
    image_input,
)
from mmqa.bundle import Bundle
from mmqa.data.readers.jsonl import JsonlReader
from mmqa.data.records import ImageRecord
from mmqa.errors import MMQAError
from mmqa.image_index import (
    INDEX_DIR,
    ImageIndex,
    Towers,
    bundle_towers,
    find_images,
    load_or_build,
)
from mmqa.inspect.maps import explain, map_choices, pick_map
from mmqa.text_generation import stream_text

MODEL_GROUP = "model"  # the concurrency group of every handler that runs a model
TOP_K = 5  # answers shown with their probabilities
TOP_INGREDIENTS = 8  # ingredients shown with their probabilities
N_EXAMPLES = 4  # test images of the built-in dataset offered as examples
HEATMAP_ALPHA = 0.5  # weight of the heatmap when blended over the image
COLORMAP = "inferno"
CACHE_SECONDS = 3600  # how long result images stay downloadable (gradio deletes older ones this often)
IMAGE_HEIGHT = 320  # pixels on the page of every image box
# small pictures (the built-in data is 64 px) fill their box, pixels kept sharp; passed to launch()
PAGE_CSS = ".mmqa-image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"
DECODINGS = ("greedy", "beam search", "sampling")
SEARCH_K = 8  # results shown by default
MAX_SEARCH_K = 32  # the most results one search may ask for
N_SKIPPED_SHOWN = 5  # unreadable gallery files named in the Search tab (the rest are counted)


def build_demo(bundle: Bundle, gallery: Path | None = None, index_dir: Path | None = None, *,
               towers: Towers | None = None, max_pixels: int = MAX_PIXELS) -> gr.Blocks:
    """The whole page; launch it with `mmqa.app.launch(build_demo(bundle))`. The Search tab searches
    the images under `gallery`, or those of the index saved in `index_dir`, or by default the test
    images of the built-in dataset the bundle was trained on (see `open_gallery`), embedded by
    `towers` (default: the bundle's own, `bundle_towers`); its index is loaded or built here, once.
    Uploaded images over `max_pixels` pixels are refused unread (`mmqa.app.inputs`)."""
    fusion = bundle.cfg.model.fusion._target_.rsplit(".", 1)[-1]
    examples = builtin_examples(bundle.cfg)
    towers = towers or bundle_towers(bundle)
    index = open_gallery(bundle, towers, gallery, index_dir)
    if index is not None:
        # served from where they are rather than copied into gradio's cache on every search: the
        # folders holding gallery images, and nothing else on disk, become readable through /file=
        gr.set_static_paths(sorted({str(Path(p).parent) for p in index.paths}))
    image_box = partial(image_input, max_pixels=max_pixels, height=IMAGE_HEIGHT, elem_classes=["mmqa-image"])

    def answer(image: Image.Image | None, question: str | None):
        check_image(image)
        question = check_text(question, "question", "type a question about the image")
        try:
            result = bundle.answer(image, question, top_k=TOP_K, return_attention=True)
        except MMQAError as e:
            raise gr.Error(str(e), print_exception=False) from None
        unknown = ", ".join(result.unknown)
        if result.attention is None:
            return (result.answer, unknown, dict(result.top), own_file(image),
                    f"{fusion} has no patch attention: no heatmap to show.")
        return result.answer, unknown, dict(result.top), own_file(overlay_attention(image, result.attention)), ""

    def caption(image: Image.Image | None, decoding: str, num_beams: int, temperature: float, top_k: int,
                top_p: float, max_new_tokens: int):
        """Yields the caption so far, word by word; the last value is `Bundle.caption`'s whole text
        (what an API client receives). Beam search has no words until it ends: it yields once."""
        check_image(image)
        kwargs = decoding_kwargs(decoding, num_beams, temperature, top_k, top_p, max_new_tokens)
        try:
            if kwargs["num_beams"] > 1:
                yield bundle.caption(image, **kwargs)
            else:
                yield from stream_text(partial(bundle.caption, image, **kwargs), bundle.decoder_tokenizer)
        except MMQAError as e:
            raise gr.Error(str(e), print_exception=False) from None

    def recipe(image: Image.Image | None, decoding: str, num_beams: int, temperature: float, top_k: int,
               top_p: float, max_new_tokens: int):
        """Yields (ingredients with probabilities, the recipe so far); the last value is `Bundle.recipe`'s
        whole text. The ingredients come first, then the recipe written from them, word by word."""
        check_image(image)
        kwargs = decoding_kwargs(decoding, num_beams, temperature, top_k, top_p, max_new_tokens)
        try:
            shown = dict(bundle.ingredients_of(image)[:TOP_INGREDIENTS])
            if kwargs["num_beams"] > 1:
                yield shown, bundle.recipe(image, **kwargs).text
            else:
                write = lambda **kw: bundle.recipe(image, **kwargs, **kw).text  # noqa: E731
                for text in stream_text(write, bundle.decoder_tokenizer):
                    yield shown, text
        except MMQAError as e:
            raise gr.Error(str(e), print_exception=False) from None

    probe = explain(bundle, Image.new("RGB", (bundle.cfg.data.image_size,) * 2), "what")  # the maps this model has
    map_names = map_choices(probe)
    max_heads = max([m.shape[0] for m in (*probe.vit.values(), *probe.question.values())], default=1)

    def inspect(image: Image.Image | None, question: str | None, choice: str, head: str):
        """(answer, the chosen map over the image, a note) for one layer and head, or a rollout."""
        check_image(image)
        question = check_text(question, "question", "type a question about the image")
        try:
            ex = explain(bundle, image, question)
            heat = pick_map(ex, choice, head)
        except MMQAError as e:
            raise gr.Error(str(e), print_exception=False) from None
        note = "" if ex.question else f"{fusion} has no question -> patch attention: only the ViT's maps."
        return f"{ex.answer} (p = {ex.probability:.2f})", own_file(overlay_attention(image, heat)), note

    def search_text(query: str | None, k: float) -> list[tuple[str, str]]:
        query = check_text(query, "search text", "describe the images to find")
        return ranked(check_gallery(index).search_text(towers.embed_text([query])[0], int(k)))

    def search_image(image: Image.Image | None, k: float) -> list[tuple[str, str]]:
        check_image(image)
        return ranked(check_gallery(index).search_image(towers.embed_image([image])[0], int(k)))

    # offline by default: no telemetry; files gradio keeps for downloads are deleted after a while
    with gr.Blocks(title="mmqa", analytics_enabled=False, delete_cache=(CACHE_SECONDS, CACHE_SECONDS)) as demo:
        gr.Markdown(f"# mmqa\nAsk about an image, have it described, or search a gallery. Model: {fusion}, "
                    f"{len(bundle.answers)} possible answers.")
        with gr.Tabs():
            with gr.Tab("Ask"):
                with gr.Row():
                    with gr.Column():
                        ask_image = image_box(label="Image")
                        question = gr.Textbox(label="Question", placeholder="what colour is the circle?",
                                              max_length=MAX_TEXT_CHARS)
                        ask = gr.Button("Ask", variant="primary")
                    with gr.Column():
                        answer_box = gr.Textbox(label="Answer")
                        # a word the tokenizer does not know: the answer may be to another question
                        unknown_box = gr.Textbox(label="These words are new to this model", placeholder="none")
                        top = gr.Label(num_top_classes=TOP_K, label=f"Top {TOP_K} answers")
                        heatmap = gr.Image(type="pil", format="png", label="Where the question looked",
                                           height=IMAGE_HEIGHT, elem_classes=["mmqa-image"])
                        note = gr.Markdown(label="Note")
                if examples:
                    gr.Examples(examples, [ask_image, question], cache_examples=False)
                outputs = [answer_box, unknown_box, top, heatmap, note]
                ask.click(answer, [ask_image, question], outputs, api_name="answer", concurrency_id=MODEL_GROUP)
                question.submit(answer, [ask_image, question], outputs, api_visibility="private",
                                concurrency_id=MODEL_GROUP)

            with gr.Tab("Describe"):
                gen = bundle.cfg.generation
                with gr.Row():
                    with gr.Column():
                        describe_image = image_box(label="Image")
                        decoding = gr.Radio(list(DECODINGS), value="greedy", label="Decoding")
                        num_beams = gr.Slider(2, 8, value=3, step=1, label="Beams", visible=False)
                        with gr.Row(visible=False) as sampling:
                            temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="Temperature")
                            top_k = gr.Slider(0, 100, value=50, step=1, label="Top-k (0: off)")
                            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                        max_new = gr.Slider(1, max(bundle.cfg.data.max_caption_length, gen.max_new_tokens),
                                            value=gen.max_new_tokens, step=1, label="Max new tokens")
                        describe = gr.Button("Describe", variant="primary")
                        if bundle.writes_recipes:
                            rgen = bundle.cfg.recipe.generation
                            recipe_max = gr.Slider(1, bundle.cfg.model.decoder.max_length, step=1,
                                                   value=rgen.max_new_tokens, label="Recipe: max new tokens")
                            write_recipe = gr.Button("Write the recipe", variant="primary")
                    with gr.Column():
                        caption_box = gr.Textbox(label="Caption")
                        if bundle.writes_recipes:
                            ingredients_box = gr.Label(num_top_classes=TOP_INGREDIENTS, label="Ingredients")
                            recipe_box = gr.Textbox(label="Recipe", lines=12)
                if examples:
                    gr.Examples([e[:1] for e in examples], [describe_image], cache_examples=False)
                decoding.change(
                    lambda d: (gr.update(visible=d == "beam search"), gr.update(visible=d == "sampling")),
                    decoding, [num_beams, sampling], api_visibility="private",
                )
                describe.click(caption, [describe_image, decoding, num_beams, temperature, top_k, top_p, max_new],
                               caption_box, api_name="caption", concurrency_id=MODEL_GROUP)
                if bundle.writes_recipes:
                    write_recipe.click(
                        recipe, [describe_image, decoding, num_beams, temperature, top_k, top_p, recipe_max],
                        [ingredients_box, recipe_box], api_name="recipe", concurrency_id=MODEL_GROUP)

            with gr.Tab("Inspect"):
                gr.Markdown("Any attention map of the model, for your question: a fusion layer's question -> "
                            "image attention (averaged over the question's words), a ViT layer's class-token "
                            "attention, or a rollout. `python -m mmqa inspect` writes them all, and how faithful each is.")
                with gr.Row():
                    with gr.Column():
                        inspect_image = image_box(label="Image")
                        inspect_question = gr.Textbox(label="Question", placeholder="what colour is the circle?",
                                                      max_length=MAX_TEXT_CHARS)
                        choice = gr.Dropdown(map_names, value=map_names[0] if map_names else None, label="Map",
                                             allow_custom_value=True)  # a wrong name gets pick_map's message
                        head = gr.Dropdown(["mean", *map(str, range(max_heads))], value="mean", label="Head",
                                           allow_custom_value=True)
                        look = gr.Button("Show", variant="primary")
                    with gr.Column():
                        inspect_answer = gr.Textbox(label="Answer")
                        inspect_map = gr.Image(type="pil", format="png", label="The map", height=IMAGE_HEIGHT,
                                               elem_classes=["mmqa-image"])
                        inspect_note = gr.Markdown()
                look.click(inspect, [inspect_image, inspect_question, choice, head],
                           [inspect_answer, inspect_map, inspect_note], api_name="inspect", concurrency_id=MODEL_GROUP)
                if examples:
                    gr.Examples(examples, [inspect_image, inspect_question], cache_examples=False)

            with gr.Tab("Search"):
                gr.Markdown(gallery_note(index, towers))
                most = min(MAX_SEARCH_K, len(index)) if index is not None else MAX_SEARCH_K
                with gr.Row():
                    with gr.Column():
                        query = gr.Textbox(label="Find images of", placeholder="a red circle",
                                           max_length=MAX_TEXT_CHARS)
                        find_text = gr.Button("Search by text", variant="primary")
                        query_image = image_box(label="…or images like this one")
                        find_image = gr.Button("Search by image")
                        k = gr.Slider(1, most, value=min(SEARCH_K, most), step=1, label="Results")
                    results = gr.Gallery(label="Nearest images (cosine similarity)", columns=4,
                                         object_fit="contain")
                find_text.click(search_text, [query, k], results, api_name="search_text", concurrency_id=MODEL_GROUP)
                query.submit(search_text, [query, k], results, api_visibility="private", concurrency_id=MODEL_GROUP)
                find_image.click(search_image, [query_image, k], results, api_name="search_image",
                                 concurrency_id=MODEL_GROUP)
                if examples:
                    gr.Examples([e[:1] for e in examples], [query_image], cache_examples=False)
    return demo


def check_gallery(index: ImageIndex | None) -> ImageIndex:
    if index is None:
        raise gr.Error("There is no gallery to search: start the demo with `--gallery DIR`.", print_exception=False)
    return index


def ranked(hits: list[tuple[str, float]]) -> list[tuple[str, str]]:
    """Search hits -> gallery items: (image path, caption with the score and the file name)."""
    return [(path, f"{score:.3f} · {Path(path).name}") for path, score in hits]


def gallery_note(index: ImageIndex | None, towers: Towers) -> str:
    if index is None:
        return "No gallery to search: start the demo with `--gallery DIR` (a folder of images)."
    note = f"{len(index)} images, searched by text or by image with {towers.name}."
    if index.skipped:
        named = "; ".join(why for _, why in index.skipped[:N_SKIPPED_SHOWN])
        more = f" and {len(index.skipped) - N_SKIPPED_SHOWN} more" if len(index.skipped) > N_SKIPPED_SHOWN else ""
        note += f" {len(index.skipped)} unreadable files were left out: {named}{more}."
    return note


def open_gallery(bundle: Bundle, towers: Towers, gallery: Path | None, index_dir: Path | None) -> ImageIndex | None:
    """The Search tab's index, embedded by `towers`: of every image under `gallery` (kept in
    `index_dir`, by default `gallery/.mmqa-index`); else of the images the index saved in `index_dir`
    lists (as `python -m mmqa index build` writes it); else of the test images of the built-in dataset
    the bundle was trained on, when it is on disk (kept beside them); else None. A saved index is
    reused only when the same towers built it from the same unchanged files, and rebuilt otherwise."""
    if gallery is not None:
        paths, index_dir = find_images(gallery), index_dir or gallery / INDEX_DIR
    elif index_dir is not None:
        paths = None  # the files the saved index lists
    else:
        dataset = builtin_dataset(bundle.cfg)
        if dataset is None:
            return None
        paths, index_dir = _test_images(dataset), dataset / INDEX_DIR
    return load_or_build(towers.model_id, towers.embed_image, paths, index_dir)


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


def own_file(image: Image.Image) -> Image.Image:
    """`image` tagged with a random PNG text chunk, so this response is saved to a file of its own.
    gradio stores a returned image under a hash of its bytes and rewrites that file in place: two
    requests with the same output would share one file, and one could read it while the other
    rewrites it (a truncated download, seen with concurrent clients)."""
    image.info["mmqa-response"] = uuid.uuid4().hex
    return image


def overlay_attention(image: Image.Image, attention: torch.Tensor) -> Image.Image:
    """A (grid, grid) attention map, stretched over the whole image as the model's resize stretches
    the image, normalised to [0, 1], coloured and blended over the image."""
    a = F.interpolate(attention.float()[None, None], size=(image.height, image.width), mode="bilinear")[0, 0]  # (H, W)
    a = (a - a.min()) / (a.max() - a.min()).clamp_min(1e-12)
    heat = colormaps[COLORMAP](a.numpy())[..., :3]  # (H, W, 3) in [0, 1]
    return Image.blend(image.convert("RGB"), Image.fromarray((heat * 255).astype(np.uint8)), HEATMAP_ALPHA)


def builtin_examples(cfg: DictConfig, n: int = N_EXAMPLES) -> list[list[str]]:
    """[image, question] pairs from the test split of the built-in dataset (shapes or dishes) this
    bundle was trained on, when it is on disk; [] for any other data, or when the dataset is not there."""
    dataset = builtin_dataset(cfg)
    return _first_questions(dataset, n) if dataset is not None else []


def builtin_dataset(cfg: DictConfig) -> Path | None:
    """The folder of the built-in dataset (shapes or dishes) this bundle was trained on (the
    generator's parameters in `meta.json` equal the config's, and its test split is there); None for
    any other data, or when the dataset is not on disk."""
    reader = cfg.data.get("reader") or {}
    if reader.get("root") is None:
        return None
    for meta_file in sorted(Path(reader.root).glob("*/meta.json")):
        try:
            params = json.loads(meta_file.read_text())["params"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a complete dataset
        if all(reader.get(k) == v for k, v in params.items()) and (meta_file.parent / "test.jsonl").is_file():
            return meta_file.parent
    return None


def _test_records(dataset: Path) -> list[ImageRecord]:
    """The test split's records, in the order of `test.jsonl`, read as training reads them."""
    return JsonlReader(dataset, check_images=False).read("test") or []


def _test_images(dataset: Path) -> list[Path]:
    """Every test image, in the order of `test.jsonl`."""
    return [r.image for r in _test_records(dataset)]


def _first_questions(dataset: Path, n: int) -> list[list[str]]:
    """The first question of each of the first n test images that have one."""
    return [[str(r.image), r.questions[0].question] for r in _test_records(dataset) if r.questions][:n]
