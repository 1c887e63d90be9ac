"""The inference bundle: everything needed to use a trained model, in safe formats only — the resolved
config (YAML), tokenizers (HF JSON), the answer and ingredient vocabularies (JSON) and the weights
(safetensors).
`Bundle.load` rebuilds the model from the stored config before loading weights, so no pickled code
is ever executed; a compressed bundle's config lists its compression steps, replayed before the
weights load (mmqa/compress/). The demo, the CLI and the tests all go through these methods.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image
from safetensors.torch import load_model, save_model

from mmqa.atomic import atomic_dir
from mmqa.build import build_model
from mmqa.compress import restructure
from mmqa.compress.lora import ADAPTER, adapter_state, merged, save_adapter
from mmqa.data.images import ImageTransform, load_image, to_rgb
from mmqa.data.recipe_text import parse_recipe
from mmqa.data.tokenizer import load_tokenizer, unknown_words
from mmqa.errors import MMQAError
from mmqa.models.mmqa_model import MMQAModel
from mmqa.recipe_generation import RecipeSettings, predict_ingredients, write_recipes
from mmqa.text_generation import generate_captions

WEIGHTS = "model.safetensors"


def write_assets(
    path: Path, cfg: DictConfig, text_tokenizer, decoder_tokenizer, answers: list[str], ingredients: list[str] = ()
) -> None:
    """Config, tokenizers and vocabularies: everything but the weights (written at the start of a run,
    so a resumed run reuses exactly the same vocabularies)."""
    path.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path / "config.yaml", resolve=True)
    text_tokenizer.save_pretrained(path / "tokenizer")
    decoder_tokenizer.save_pretrained(path / "decoder_tokenizer")
    (path / "answers.json").write_text(json.dumps(answers, indent=0))
    (path / "ingredients.json").write_text(json.dumps(list(ingredients), indent=0))


# Where classes named in the configs of older bundles live now (a bundle rebuilds its model from them)
MOVED_TARGETS = {
    "mmqa.models.decoder.CaptionDecoder": "mmqa.models.decoder.GPT2Decoder",
    "mmqa.data.builtin.ShapesReader": "mmqa.data.readers.shapes.ShapesReader",
    "mmqa.data.builtin.DishesReader": "mmqa.data.readers.dishes.DishesReader",
    "mmqa.data.readers.JsonlReader": "mmqa.data.readers.jsonl.JsonlReader",
    "mmqa.data.readers.VQAv2Reader": "mmqa.data.readers.vqav2.VQAv2Reader",
    "mmqa.data.readers.CocoCaptionsReader": "mmqa.data.readers.coco_captions.CocoCaptionsReader",
    "mmqa.data.recipe1m.Recipe1MReader": "mmqa.data.readers.recipe1m.Recipe1MReader",
}


def upgrade_config(cfg: DictConfig) -> DictConfig:
    """A bundle config written by an older mmqa, in today's terms: moved classes under their new
    names, and the image normalisation (once `data.mean` / `data.std`) with the image encoder that
    owns it now."""
    def walk(node):
        if isinstance(node, DictConfig):
            if node.get("_target_") in MOVED_TARGETS:
                node._target_ = MOVED_TARGETS[node._target_]
            for key in node:
                walk(node._get_node(key))
    walk(cfg)
    with open_dict(cfg):
        cfg.model.setdefault("image_position_scale", 0.0)  # bundles from before grid positions had none
    data, enc = cfg.get("data") or {}, OmegaConf.select(cfg, "model.image_encoder") or {}
    if "mean" in data and "mean" not in enc and enc.get("_target_", "").endswith("TimmImageEncoder"):
        with open_dict(cfg):
            enc.mean, enc.std = data.mean, data.std
            enc.setdefault("stem_channels", None)
            enc.setdefault("stem_strides", None)
    return cfg


def read_assets(path: Path) -> tuple[DictConfig, object, object, list[str], list[str]]:
    """(config, text tokenizer, decoder tokenizer, answers, ingredients); bundles from before the
    recipe task have no ingredients.json and read as having no ingredients."""
    path = Path(path)
    missing = [n for n in ("config.yaml", "tokenizer", "decoder_tokenizer", "answers.json") if not (path / n).exists()]
    if missing:
        raise MMQAError(f"{path} is not an mmqa bundle: missing {', '.join(missing)}")
    try:  # OmegaConf reads YAML with a safe loader: a `!!python/...` tag is refused, never run
        cfg = upgrade_config(OmegaConf.load(path / "config.yaml"))
    except yaml.YAMLError as e:
        raise MMQAError(f"{path / 'config.yaml'}: not a valid bundle config: {e}") from None
    answers = json.loads((path / "answers.json").read_text())
    ing_file = path / "ingredients.json"
    ingredients = json.loads(ing_file.read_text()) if ing_file.is_file() else []
    return cfg, load_tokenizer(path / "tokenizer"), load_tokenizer(path / "decoder_tokenizer"), answers, ingredients


@dataclass
class Answer:
    answer: str
    top: list[tuple[str, float]]  # the top-k answers with their probabilities
    attention: torch.Tensor | None  # (grid, grid) question -> patch attention, averaged over heads and tokens
    unknown: list[str]  # words of the question the text tokenizer does not know (mmqa.data.tokenizer.unknown_words)


@dataclass
class Recipe:
    ingredients: list[tuple[str, float]]  # every vocabulary ingredient with its probability, most likely first
    used: list[str]  # the set the recipe was written with (predicted, or given)
    text: str  # the generated text
    title: str  # parsed from `text`
    lines: list[str]  # the recipe's ingredient lines, with quantities
    steps: list[str]


class Bundle:
    def __init__(
        self,
        cfg: DictConfig,
        model: MMQAModel,
        text_tokenizer,
        decoder_tokenizer,
        answers: list[str],
        ingredients: list[str] = (),
    ):
        self.cfg = cfg
        self.model = model.eval()
        self.text_tokenizer = text_tokenizer
        self.decoder_tokenizer = decoder_tokenizer
        self.answers = answers
        self.ingredients = list(ingredients)
        self._tokenizer_lock = threading.Lock()
        self.transform = ImageTransform(cfg.data.image_size, *model.image_encoder.normalization)

    # ----------------------------------------------------------------------------- save / load
    def save(self, path: str | Path) -> Path:
        """Write atomically: into a temporary sibling, then rename over `path`. A model trained with LoRA
        is saved merged (the plain model the config builds) and its adapter alone beside it."""
        path = Path(path)
        adapter = adapter_state(self.model)  # {} without LoRA
        with atomic_dir(path) as tmp:
            write_assets(tmp, self.cfg, self.text_tokenizer, self.decoder_tokenizer, self.answers, self.ingredients)
            save_model(merged(self.model) if adapter else self.model, str(tmp / WEIGHTS))  # handles GPT-2's tied embeddings
            if adapter:
                save_adapter(adapter, self.cfg.lora, tmp / ADAPTER)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "Bundle":
        path = Path(path)
        cfg, text_tok, dec_tok, answers, ingredients = read_assets(path)
        if not (path / WEIGHTS).is_file():
            raise MMQAError(f"{path} is not an mmqa bundle: missing {WEIGHTS}")
        model = build_model(cfg.model, len(answers), text_tok, dec_tok, len(ingredients))
        restructure(model, cfg, path)  # a compressed bundle: its smaller or int8 layers, before the weights
        load_model(model, str(path / WEIGHTS), device=device)
        return cls(cfg, model.to(device), text_tok, dec_tok, answers, ingredients)

    # ----------------------------------------------------------------------------- inference
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _images(self, images: list) -> torch.Tensor:
        pil = [to_rgb(im) if isinstance(im, Image.Image) else load_image(im) for im in images]
        return torch.stack([self.transform(im) for im in pil]).to(self.device)  # (B, 3, S, S)

    def _text(self, texts: list[str], max_length: int):
        """Tokenised as in training: questions cut at `max_question_length`, captions at `max_caption_length`."""
        with self._tokenizer_lock:  # a fast tokenizer keeps its truncation length as state: one caller at a time
            enc = self.text_tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        enc = enc.to(self.device)
        return self.model.encode_text(enc["input_ids"], enc["attention_mask"])

    @torch.no_grad()
    def answer(self, image, question: str, top_k: int = 5, return_attention: bool = False) -> Answer:
        """Answer one question about one image (a path or a PIL image); `unknown` lists the question's
        words this model has no token for, whose meaning it cannot know."""
        return self.answer_batch([image], [question], top_k, return_attention)[0]

    @torch.no_grad()
    def answer_batch(self, images: list, questions: list[str], top_k: int = 5, return_attention: bool = False) -> list[Answer]:
        """Answer `questions[i]` about `images[i]`, or every question about `images[0]` when one image is
        given, all in one batch: each image is encoded once, and each question reads its image's tokens."""
        if len(images) not in (1, len(questions)):
            raise MMQAError(f"answer_batch: {len(images)} images but {len(questions)} questions; give one image per "
                            "question, or one image for all of them")
        img = self.model.encode_images(self._images(images))  # tokens (B, N, D), B = 1 or Q
        q = self._text(questions, self.cfg.data.max_question_length)  # tokens (Q, T, D)
        idx = torch.arange(len(questions), device=self.device)  # (Q,) image row of each question
        if len(images) == 1:
            idx = torch.zeros_like(idx)
        logits, fused = self.model.answer_logits(img, idx, q, return_attention=return_attention)  # (Q, K)
        probs = logits.sigmoid()  # soft-score BCE: independent per-answer probabilities
        p, i = probs.topk(min(top_k, len(self.answers)), dim=-1)  # (Q, k)
        with self._tokenizer_lock:  # tokenizing resets the tokenizer's truncation state
            unknown = [unknown_words(self.text_tokenizer, question) for question in questions]
        out = []
        for b in range(len(questions)):
            top = [(self.answers[j], float(v)) for v, j in zip(p[b].tolist(), i[b].tolist())]
            attn = None
            if fused.attention is not None:  # (Q, h, T, N): the question's own tokens, averaged with the heads
                g = self.model.grid
                attn = fused.attention[b][:, q.mask[b]].mean(dim=(0, 1)).reshape(g, g).cpu()  # (g, g)
            out.append(Answer(answer=top[0][0], top=top, attention=attn, unknown=unknown[b]))
        return out

    @torch.no_grad()
    def caption(self, image, **generate_kwargs) -> str:
        """Describe one image; `generate_kwargs` go to transformers' `generate` (num_beams, do_sample, ...)."""
        return self.caption_batch([image], **generate_kwargs)[0]

    @torch.no_grad()
    def caption_batch(self, images: list, **generate_kwargs) -> list[str]:
        """Describe each image, all in one batch."""
        img = self.model.encode_images(self._images(images))
        kwargs = {**OmegaConf.to_container(self.cfg.generation), **generate_kwargs}
        return generate_captions(self.model, self.decoder_tokenizer, img, **kwargs)

    @property
    def writes_recipes(self) -> bool:
        """Trained on recipes: it has an ingredient head (the demo's Describe tab then writes recipes)."""
        return self.model.ingredient_head is not None and bool(self.ingredients)

    @torch.no_grad()
    def recipe(self, image, ingredients: list[str] | None = None, threshold: float | None = None, **generate_kwargs) -> Recipe:
        """Predict the ingredients of a dish photo, then write its recipe with them (or with the given
        `ingredients`). `threshold` defaults to the training config's `recipe.prompt_threshold`;
        `generate_kwargs` go to transformers' `generate` (a `streamer` too)."""
        self._require_recipes()
        settings = RecipeSettings.of(self.cfg.get("recipe"))
        img = self.model.encode_images(self._images([image]))
        probs, sets = predict_ingredients(
            self.model, img, self.ingredients, settings.prompt_threshold if threshold is None else threshold
        )
        used = sorted(ingredients) if ingredients is not None else sets[0]
        kwargs = {**settings.generation, **generate_kwargs}
        text = write_recipes(
            self.model, self.decoder_tokenizer, img, [used], settings.banned_from(self.ingredients), **kwargs
        )[0]
        parsed = parse_recipe(text)
        return Recipe(self._ranked(probs[0]), used, text, parsed["title"], parsed["ingredients"], parsed["steps"])

    @torch.no_grad()
    def ingredients_of(self, image) -> list[tuple[str, float]]:
        """Every vocabulary ingredient with its probability of being in the dish, most likely first."""
        self._require_recipes()
        img = self.model.encode_images(self._images([image]))
        return self._ranked(self.model.ingredient_logits(img)[0].sigmoid())

    def _require_recipes(self) -> None:
        if not self.writes_recipes:
            raise MMQAError("this bundle was not trained on recipes (no ingredient vocabulary); train with experiment=recipes")

    def _ranked(self, probs: torch.Tensor) -> list[tuple[str, float]]:  # (I,) -> most likely first
        return sorted(zip(self.ingredients, probs.tolist()), key=lambda kv: -kv[1])

    @torch.no_grad()
    def embed_image(self, images: list) -> torch.Tensor:  # -> (B, E) unit norm
        return self.model.embed_image(self.model.encode_images(self._images(images)))

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> torch.Tensor:  # -> (T, E) unit norm
        return self.model.embed_text(self._text(texts, self.cfg.data.max_caption_length))
