"""Activation patching (causal tracing: Vig et al. 2020, Meng et al. 2022): which activations carry an
object's colour to the answer?

Pairs come from the shapes world (`colour_pairs`): a scene of the split, and the same scene with one
object recoloured (`shapes.recolour`), both drawn by the world's renderer with the same background
noise, so the two images differ only inside that object (the clean image is drawn anew: its noise is
not the stored PNG's). The question is the world's own "what colour
is the <ref>?", worded with its templates and a reference that leaves the colour unsaid (so it still
picks out the object after the change). The model reads the clean image (answer A) and the corrupted
one (answer B); then the corrupted run is repeated with one site's activation replaced by the clean
run's, one site at a time (`sites`):

- `image/blocks.i`: the output of ViT block i (every token);
- `fusion/input`: the image tokens entering the fusion (projected, position added), all patches;
- `fusion/text_blocks.i` (cross fusion: the question stream) or `fusion/blocks.i` (early fusion: the
  joint sequence): the output of fusion layer i. Late fusion has no layers, and says so.

A whole ViT block or the whole fusion input carries everything the image says, so patching one
restores the answer completely by construction; the informative variant of those sites, `<site>
(object patches)`, copies only the tokens of the patches the recolouring touched (`object_patches`:
where the two images differ) and keeps the corrupted run's everywhere else: how much of the answer
sits in the object's own tokens at that depth, and how much has spread to the others.

Per site, over the pairs the model answers correctly when clean and otherwise when corrupted: the mean
share of the answer restored, (p_A(patched) - p_A(corrupted)) / (p_A(clean) - p_A(corrupted)), with p_A
the sigmoid probability of A (the VQA head scores each answer on its own), and the share of pairs whose
patched answer is A.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from mmqa.data.readers.shapes import ShapesReader
from mmqa.data.worlds.shapes import COLOURS, TEMPLATES, Scene, SceneFacts, read_scenes, recolour, render_scene
from mmqa.inspect.lens import fusion_layers
from mmqa.inspect.maps import InspectError
from mmqa.models.outputs import EncoderOutput

BATCH = 32  # pairs per forward pass


@dataclass(frozen=True)
class Pair:
    clean: Image.Image
    corrupted: Image.Image  # the same scene, one object recoloured
    question: str  # "what colour is the <ref>?" about that object
    answer: str  # its colour in the clean scene
    colour: str  # and in the corrupted one


@dataclass(frozen=True)
class Site:
    name: str
    module: nn.Module
    reads_input: bool = False  # the activation is the module's first input, not its output
    prefix: int | None = None  # tokens before the patches in the activation (CLS); None: no patch tokens


def colour_pairs(scenes: Sequence[Scene], image_size: int, n: int, seed: int) -> list[Pair]:
    """`n` pairs (fewer if the scenes hold fewer askable objects): objects drawn at random among those
    the world may ask the colour of, each recoloured to another colour drawn at random."""
    askable = []  # (scene, object, the references that single it out without its colour)
    for k, scene in enumerate(scenes):
        facts = SceneFacts.of(scene, image_size)
        askable += [(k, i, refs) for i in range(len(scene.objects)) if (refs := facts.ref_texts(i, unsaid="colour"))]
    rng = random.Random(seed)
    rng.shuffle(askable)
    pairs = []
    for k, i, refs in askable[:n]:
        scene = scenes[k]
        answer = scene.objects[i].colour
        colour = rng.choice([c for c in COLOURS if c != answer])
        question = rng.choice(TEMPLATES["colour_of"]).format(ref=rng.choice(refs))
        clean, corrupted = (render_scene(s, image_size, np.random.default_rng([seed, k]))  # the same noise
                            for s in (scene, recolour(scene, i, colour)))
        pairs.append(Pair(clean, corrupted, question, answer, colour))
    return pairs


def world_pairs(dm, split: str, n: int, seed: int) -> list[Pair]:
    """`colour_pairs` of the scenes of `split` of the shapes dataset `dm` (a data module) reads."""
    if not isinstance(dm.reader, ShapesReader):
        raise InspectError(f"activation patching recolours objects of the shapes world; data has a "
                           f"{type(dm.reader).__name__}: valid: data=shapes, data=shapes_relational")
    dataset = dm.reader.dataset_dir
    scenes = read_scenes(dataset, split)
    if not scenes:
        raise InspectError(f"split={split!r} has no scenes in {dataset / 'scenes.jsonl'}; valid: train, val, test")
    image_size = json.loads((dataset / "meta.json").read_text(encoding="utf-8"))["params"]["image_size"]
    pairs = colour_pairs(scenes, image_size, n, seed)
    if not pairs:
        raise InspectError(f"split={split!r}: no object in its scenes has a colour the world would ask about")
    return pairs


def vit_blocks(image_encoder: nn.Module) -> list[nn.Module]:
    """The image encoder's transformer blocks: timm's `vit.blocks`, open_clip's `visual.transformer.resblocks`."""
    if hasattr(image_encoder, "vit"):
        return list(image_encoder.vit.blocks)
    return list(image_encoder.visual.transformer.resblocks)


def sites(model: nn.Module) -> list[Site]:
    """Every site patched, in the order the model runs them: ViT blocks, the fusion's input, fusion layers."""
    layers = fusion_layers(model.fusion, "activation patching")
    names = {m: name for name, m in model.fusion.named_modules()}
    prefix = getattr(getattr(model.image_encoder, "vit", None), "num_prefix_tokens", 1)
    return [*(Site(f"image/blocks.{i}", blk, prefix=prefix) for i, blk in enumerate(vit_blocks(model.image_encoder))),
            Site("fusion/input", model.fusion, reads_input=True, prefix=0),
            *(Site(f"fusion/{names[blk]}", blk) for blk in layers)]


@contextlib.contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def recording(site_list: Sequence[Site], into: dict[str, torch.Tensor]) -> contextlib.AbstractContextManager:
    """Store each site's activation of the next forward pass in `into[site.name]`."""
    def keep(site: Site):
        if site.reads_input:
            return site.module.register_forward_pre_hook(lambda m, args: into.__setitem__(site.name, args[0]))
        return site.module.register_forward_hook(
            lambda m, args, out: into.__setitem__(site.name, out[0] if isinstance(out, tuple) else out))

    return _hooks([keep(s) for s in site_list])


def patching(site: Site, value: torch.Tensor) -> contextlib.AbstractContextManager:
    """Replace the site's activation by `value` (same shape) in every forward pass until exit."""
    if site.reads_input:
        return _hooks([site.module.register_forward_pre_hook(lambda m, args: (value, *args[1:]))])
    return _hooks([site.module.register_forward_hook(
        lambda m, args, out: (value, *out[1:]) if isinstance(out, tuple) else value)])


def object_patches(clean: torch.Tensor, corrupted: torch.Tensor, grid: int) -> torch.Tensor:
    """(P, N) bool: the patches where the two images (P, 3, S, S) differ in any pixel."""
    changed = (clean != corrupted).any(1)  # (P, S, S)
    P, S, _ = changed.shape
    return changed.reshape(P, grid, S // grid, grid, S // grid).any(4).any(2).reshape(P, grid * grid)


def probabilities(model: nn.Module, images: torch.Tensor, question: EncoderOutput) -> torch.Tensor:
    """(P, K) answer probabilities of question i about image i."""
    img = model.encode_images(images)  # tokens (P, N, D)
    logits, _ = model.answer_logits(img, torch.arange(len(images), device=images.device), question)
    return logits.sigmoid()


@torch.no_grad()
def trace(model: nn.Module, clean: torch.Tensor, corrupted: torch.Tensor, question: EncoderOutput,
          site_list: Sequence[Site], regions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{"clean": (P, K), "corrupted": (P, K), site name: (P, K) with that site patched from the clean run,
    and with `regions` (P, N) bool, "<site> (object patches)": only those patches' tokens patched}:
    answer probabilities of P pairs, images (P, 3, S, S) each, question i about pair i."""
    recorded: dict[str, torch.Tensor] = {}
    with recording(site_list, recorded):
        out = {"clean": probabilities(model, clean, question)}
    base: dict[str, torch.Tensor] = {}
    with recording(site_list, base):
        out["corrupted"] = probabilities(model, corrupted, question)
    for site in site_list:
        with patching(site, recorded[site.name]):
            out[site.name] = probabilities(model, corrupted, question)
        if regions is not None and site.prefix is not None:
            keep = torch.nn.functional.pad(regions, (site.prefix, 0))[..., None]  # (P, prefix + N, 1)
            with patching(site, torch.where(keep, recorded[site.name], base[site.name])):
                out[f"{site.name} (object patches)"] = probabilities(model, corrupted, question)
    return out


def restored(probs: dict[str, torch.Tensor], answer: torch.Tensor) -> dict[str, torch.Tensor]:
    """{site: (P,) share of the clean answer restored} from `trace`'s probabilities; `answer` (P,)."""
    p = {k: v.gather(1, answer[:, None])[:, 0] for k, v in probs.items()}  # (P,) p of the clean answer
    gap = p["clean"] - p["corrupted"]
    return {k: (v - p["corrupted"]) / gap for k, v in p.items() if k not in ("clean", "corrupted")}


def evaluate(bundle, pairs: Sequence[Pair]) -> tuple[list[dict], dict[str, int]]:
    """(one row per site: pairs used, share restored (mean, standard error), share answered as clean;
    counts of the pairs tried, used and skipped)."""
    model = bundle.model.eval()
    site_list = sites(model)
    fractions: dict[str, list[torch.Tensor]] = {}
    flipped: dict[str, list[torch.Tensor]] = {}
    counts = {"tried": len(pairs), "used": 0, "clean_wrong": 0, "corrupted_unchanged": 0}
    for start in range(0, len(pairs), BATCH):
        chunk = pairs[start:start + BATCH]
        with torch.no_grad():
            question = bundle._text([p.question for p in chunk], bundle.cfg.data.max_question_length)
        clean, corrupted = bundle._images([p.clean for p in chunk]), bundle._images([p.corrupted for p in chunk])
        probs = trace(model, clean, corrupted, question, site_list, object_patches(clean, corrupted, model.grid))
        truth = torch.tensor([bundle.answers.index(p.answer) if p.answer in bundle.answers else -1 for p in chunk],
                             device=bundle.device)
        a, b = probs["clean"].argmax(-1), probs["corrupted"].argmax(-1)  # (P,)
        right = a == truth
        used = right & (b != a)
        counts["clean_wrong"] += int((~right).sum())
        counts["corrupted_unchanged"] += int((right & (b == a)).sum())
        counts["used"] += int(used.sum())
        for name, f in restored(probs, a).items():
            fractions.setdefault(name, []).append(f[used].cpu())
            flipped.setdefault(name, []).append((probs[name].argmax(-1) == a)[used].cpu())
    rows = []
    for name in fractions:
        f, hit = torch.cat(fractions[name]).double(), torch.cat(flipped[name]).double()
        n = len(f)
        rows.append({"site": name, "pairs": n, "skipped": counts["tried"] - n, "restored": float(f.mean()) if n else math.nan,
                     "restored_se": float(f.std() / math.sqrt(n)) if n > 1 else math.nan,
                     "answer_restored": float(hit.mean()) if n else math.nan})
    return rows, counts
