"""Attention maps of one VQA example, from the calls `capture.py` records in one forward pass.

`explain(bundle, image, question)` answers the question with every attention captured and returns an
`Explanation`: the answer, the question's tokens, and per attention site the weights a user wants to
see, laid on the image's patch grid:

- `vit`: per ViT layer, each head's CLS -> patch attention (h, g, g);
- `question`: per fusion layer, each head's question-token -> patch attention (h, T, g, g): the
  text -> image cross-attention of cross fusion, or the question rows x patch columns of early fusion's
  joint self-attention (early fusion's other modality blocks are in `modality_blocks`);
- `rollout`: attention rollout (Abnar & Zuidema 2020) through the ViT, CLS -> patches (g, g);
- `relevance`: the gradient-weighted relevance of the patches for the answer (Chefer et al. 2021,
  `relevance.py`), from a second pass with gradients (g, g).

`patch_relevance(explanation, method)` reduces them to one (g, g) map per method, the maps
`faithfulness.py` checks: the last fusion layer's question attention, the mean over fusion layers, the
ViT rollout, the question attention carried through the ViT rollout, the gradient-weighted relevance,
and a random baseline. Late fusion has no question -> patch attention, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mmqa.errors import MMQAError
from mmqa.inspect.capture import AttentionCall, capture_attention
from mmqa.inspect.relevance import answer_relevance
from mmqa.models.outputs import EncoderOutput

METHODS = ("last_layer", "mean_layers", "vit_rollout", "question_rollout", "chefer", "random")


class InspectError(MMQAError, ValueError):
    """A request the model cannot answer (no such layer, no patch attention): the message says what is valid."""


@dataclass
class Explanation:
    answer: str
    probability: float
    tokens: list[str]  # the question's real tokens, as the text encoder saw them
    grid: int
    vit: dict[str, torch.Tensor] = field(default_factory=dict)  # site -> (h, g, g) CLS -> patch
    question: dict[str, torch.Tensor] = field(default_factory=dict)  # site -> (h, T, g, g) question token -> patch
    rollout: torch.Tensor | None = None  # (g, g), CLS -> patches through every ViT layer
    vit_rollout_matrix: torch.Tensor | None = None  # (N, N) patch -> patch part of the rollout, rows summing to 1
    pixels: torch.Tensor | None = None  # (1, 3, S, S) the image as the model read it
    encoded: EncoderOutput | None = None  # the question as the text encoder encoded it (one row)
    relevance: torch.Tensor | None = None  # (g, g) gradient-weighted relevance for the answer (Chefer et al.)
    relevance_note: str = ""  # why there is none


def modality_blocks(weights: torch.Tensor, n_patches: int) -> dict[str, torch.Tensor]:
    """Early fusion's joint self-attention [fusion token, N patches, T words] split by modality:
    (B, h, 1+N+T, 1+N+T) -> {"text->image": (B, h, T, N), "text->text", "image->image", "image->text"}."""
    image, text = slice(1, 1 + n_patches), slice(1 + n_patches, None)
    return {"text->image": weights[:, :, text, image], "text->text": weights[:, :, text, text],
            "image->image": weights[:, :, image, image], "image->text": weights[:, :, image, text]}


def rollout(layers: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout: each layer's head-mean attention (S, S) plus the identity (the residual),
    rows renormalised, multiplied from the first layer to the last; rows of the result sum to 1."""
    joint = torch.eye(layers[0].shape[-1], dtype=torch.float64)
    for a in layers:
        a = a.double() + torch.eye(a.shape[-1], dtype=torch.float64)
        joint = (a / a.sum(-1, keepdim=True)) @ joint
    return joint.float()


def _split(calls: list[AttentionCall], grid: int, prefix: int) -> Explanation:
    n = grid * grid
    ex = Explanation("", 0.0, [], grid)
    vit_layers = []
    for call in calls:
        w = call.weights()[0]  # (h, T, N): one example
        if call.site.startswith("image/"):
            vit_layers.append(w.mean(0))
            ex.vit[call.site] = w[:, 0, prefix:].reshape(-1, grid, grid)
        elif call.site.startswith("fusion/") and call.site.endswith("/cross") and call.k.shape[2] == n \
                and "text_blocks" in call.site:
            ex.question[call.site] = w.reshape(*w.shape[:2], grid, grid)
        elif call.site.startswith("fusion/") and call.q.shape[2] == call.k.shape[2] > 1 + n:  # early fusion
            ex.question[call.site] = modality_blocks(w[None], n)["text->image"][0].reshape(w.shape[0], -1, grid, grid)
    if vit_layers:
        joint = rollout(vit_layers)  # (P + N, P + N)
        ex.rollout = joint[0, prefix:].reshape(grid, grid)
        patches = joint[prefix:, prefix:]
        ex.vit_rollout_matrix = patches / patches.sum(-1, keepdim=True).clamp_min(1e-12)
    return ex


@torch.no_grad()
def explain(bundle, image, question: str, relevance: bool = True) -> Explanation:
    """Answer `question` about `image` with every attention captured (outputs as without capture);
    `relevance`: also the gradient-weighted relevance, which costs a pass with gradients."""
    model = bundle.model
    pixels = bundle._images([image])  # (1, 3, S, S)
    with bundle._tokenizer_lock:
        enc = bundle.text_tokenizer([question], truncation=False, return_tensors="pt")
    limit = bundle.cfg.data.max_question_length
    if enc["input_ids"].shape[1] > limit:
        raise InspectError(f"the question has {enc['input_ids'].shape[1]} tokens; this model reads at most {limit} "
                           f"(data.max_question_length): shorten it")
    enc = enc.to(bundle.device)
    with capture_attention(model) as calls:
        img = model.encode_images(pixels)
        q = model.encode_text(enc["input_ids"], enc["attention_mask"])
        logits, _ = model.answer_logits(img, torch.zeros(1, dtype=torch.long, device=bundle.device), q)
    prefix = getattr(getattr(model.image_encoder, "vit", None), "num_prefix_tokens", 1)
    ex = _split(calls, model.grid, prefix)
    probs = logits[0].sigmoid()
    ex.answer, ex.probability = bundle.answers[int(probs.argmax())], float(probs.max())
    ex.tokens = bundle.text_tokenizer.convert_ids_to_tokens(enc["input_ids"][0].tolist())
    ex.pixels, ex.encoded = pixels, q  # what faithfulness perturbs and re-reads
    if not relevance:
        ex.relevance_note = "not computed (explain(..., relevance=False))"
    elif not ex.question:
        ex.relevance_note = "no question -> patch attention in this model (late fusion pools each modality first)"
    else:
        try:
            ex.relevance = answer_relevance(model, pixels, enc["input_ids"], enc["attention_mask"],
                                            bundle.answers.index(ex.answer), prefix)
        except ValueError as e:  # an attention without a rule (bidirectional cross fusion's image blocks)
            ex.relevance_note = str(e)
    return ex


def patch_relevance(ex: Explanation, method: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """One (g, g) relevance map of the patches for `method` (one of METHODS)."""
    if method not in METHODS:
        raise InspectError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if method == "random":
        return torch.rand(ex.grid, ex.grid, generator=generator)
    if method == "vit_rollout":
        if ex.rollout is None:
            raise InspectError("vit_rollout: this image encoder's attention is not captured (not a timm ViT)")
        return ex.rollout
    if method == "chefer":
        if ex.relevance is None:
            raise InspectError(f"chefer: {ex.relevance_note}")
        return ex.relevance
    if not ex.question:
        raise InspectError(f"{method}: no question -> patch attention in this model (late fusion pools each "
                           f"modality before fusing); valid here: vit_rollout, random")
    layers = [m.mean(dim=(0, 1)) for m in ex.question.values()]  # (g, g) each: mean over heads and tokens
    if method == "last_layer":
        return layers[-1]
    if method == "mean_layers":
        return torch.stack(layers).mean(0)
    if ex.vit_rollout_matrix is None:
        raise InspectError("question_rollout: this image encoder's attention is not captured (not a timm ViT)")
    # a fusion token reads patch j, which carries rollout[j, i] of patch i's input
    return (layers[-1].reshape(1, -1) @ ex.vit_rollout_matrix).reshape(ex.grid, ex.grid)


DERIVED = {"rollout (ViT)": "vit_rollout", "question through the ViT rollout": "question_rollout",
           "relevance for the answer (Chefer et al.)": "chefer"}


def map_choices(ex: Explanation) -> list[str]:
    """The maps a user may pick for this model: each fusion layer's question -> patch attention, each
    ViT layer's CLS -> patch attention, and the derived maps (rollouts, relevance) the model has."""
    has = {"vit_rollout": ex.rollout is not None, "question_rollout": ex.rollout is not None and bool(ex.question),
           "chefer": ex.relevance is not None}
    return [*ex.question, *ex.vit, *(name for name, method in DERIVED.items() if has[method])]


def pick_map(ex: Explanation, choice: str, head: str = "mean") -> torch.Tensor:
    """The (g, g) map of `choice` (one of `map_choices`) for `head` ("mean" or a head number); question
    maps are averaged over the question's tokens."""
    if choice in DERIVED and choice in map_choices(ex):
        return patch_relevance(ex, DERIVED[choice])
    maps = ex.question.get(choice)
    maps = maps.mean(1) if maps is not None else ex.vit.get(choice)  # (h, g, g)
    if maps is None:
        raise InspectError(f"no map {choice!r} in this model; valid: {', '.join(map_choices(ex))}")
    if head == "mean":
        return maps.mean(0)
    if not str(head).isdigit() or int(head) >= maps.shape[0]:
        raise InspectError(f"head {head!r}: {choice} has heads 0 to {maps.shape[0] - 1}, or 'mean'")
    return maps[int(head)]


@torch.no_grad()
def caption_maps(bundle, image, max_new_tokens: int | None = None) -> list[tuple[str, torch.Tensor]]:
    """The caption of `image`, greedy, word by word: (token, (g, g) the decoder's cross-attention over
    the patches while predicting it, mean over heads and layers). `max_new_tokens` defaults to the
    bundle's own generation setting."""
    max_new_tokens = max_new_tokens or bundle.cfg.generation.max_new_tokens
    model = bundle.model
    img = model.encode_images(bundle._images([image]))
    tok = bundle.decoder_tokenizer
    prompt = torch.full((1, 1), tok.bos_token_id, dtype=torch.long, device=bundle.device)
    with capture_attention(model.decoder, include=r"crossattention") as calls:
        ids = model.generate(img, prompt, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)[0, 1:]
    if not calls:
        raise InspectError("this decoder has no cross-attention to capture")
    layers = len({c.site for c in calls})
    g = model.grid
    # one call per layer and decoding step; the step predicting token i reads the image with its last query
    steps = [torch.stack([c.weights()[0, :, -1] for c in calls[i:i + layers]]).mean((0, 1)) for i in range(0, len(calls), layers)]
    words = tok.convert_ids_to_tokens(ids.tolist())
    return [(w, m[-g * g:].reshape(g, g)) for w, m in zip(words, steps) if w not in tok.all_special_tokens]
