"""The LightningModule: the multi-task loss (VQA soft-score BCE + caption LM + CLIP contrastive +
caption-concept BCE + ingredient BCE + recipe LM, each computed only where the batch has its labels
and weighted from the config; with a teacher, the distillation terms too), the metrics under "split/name" keys, and the optimiser and schedule
given by the config (conf/optim/, conf/scheduler/), completed here with the parameters. The model
itself is plain PyTorch (`mmqa.models`); the concept head, a training-only aid, lives here and is not
part of the exported bundle. `mmqa.build.build_lit_module` builds it from a config."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from open_clip.loss import ClipLoss
from transformers import get_cosine_schedule_with_warmup, get_wsd_schedule

from mmqa.compress.distill import Distiller
from mmqa.compress.lora import check_towers
from mmqa.data.batch import Batch
from mmqa.data.recipe_text import ingredient_names, parse_recipe
from mmqa.errors import MMQAError
from mmqa.metrics import CaptionScores, RetrievalRecall, VQAAccuracy
from mmqa.metrics.ingredients import HallucinationRate, IngredientScores
from mmqa.models.heads import PatchSetHead
from mmqa.models.mmqa_model import MMQAModel
from mmqa.recipe_generation import RecipeSettings, predict_ingredients, write_recipes
from mmqa.text_generation import generate_captions

TASKS = ("vqa", "caption", "contrastive", "concepts", "ingredients", "recipe")
# each epoch metric (attribute `<split>_<name>`) -> the keys logged under "<split>/" from its value
EPOCH_METRICS = {
    "vqa": dict,
    "retrieval": dict,
    "captions": dict,
    "ingredients": lambda v: {f"ingredient_{k}": x for k, x in v.items()},
    "recipe_bleu": lambda v: {"recipe_bleu4": v["bleu4"]},  # of the instructions
    "hallucination": lambda v: {"recipe_hallucination": v},
    "recipe_nll": lambda v: {"recipe_perplexity": v.exp()},  # mean NLL per recipe token
}


def warmup_cosine(optimizer: torch.optim.Optimizer, num_training_steps: int, warmup_fraction: float):
    """Linear warmup over `warmup_fraction` of the steps, then cosine decay to 0 (conf/scheduler/warmup_cosine.yaml)."""
    return get_cosine_schedule_with_warmup(optimizer, int(warmup_fraction * num_training_steps), num_training_steps)


def warmup_stable_decay(optimizer: torch.optim.Optimizer, num_training_steps: int, warmup_fraction: float,
                        decay_fraction: float):
    """Linear warmup over `warmup_fraction` of the steps, the peak rate held, then cosine decay to 0 over
    the last `decay_fraction` (transformers' WSD schedule; conf/scheduler/warmup_stable_decay.yaml)."""
    return get_wsd_schedule(optimizer, int(warmup_fraction * num_training_steps),
                            int(decay_fraction * num_training_steps), num_training_steps)


def summed_bce(logits: torch.Tensor, targets: torch.Tensor, row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """BCE summed over the vocabulary and averaged over rows: the usual VQA scale, shared by every
    multi-label term (answers, ingredients, caption concepts). `row_weight` (R,): a factor on each
    row's sum (the average stays over R rows, so weights above 1 add to the term)."""
    if row_weight is None:
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(logits)
    per_row = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1)  # (R,)
    return (per_row * row_weight).sum() / len(logits)


class NonFiniteLossError(MMQAError):
    """A loss term became NaN or infinite; the message names the term and the step."""


class LitMMQA(L.LightningModule):
    def __init__(
        self,
        model: MMQAModel,
        answers: list[str],
        families: list[str],
        decoder_tokenizer,
        loss_weights: dict[str, float],
        optimizer: Callable[..., torch.optim.Optimizer] | None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None,
        generation: dict,
        max_caption_eval_images: int,
        ingredients: list[str] = (),
        recipe: dict | None = None,
        concepts: list[str] = (),
        distiller: Distiller | None = None,
        lr_scale: dict[str, float] | None = None,
        family_weight: dict[str, float] | None = None,
    ):
        """`optimizer` and `scheduler`: partials (`_partial_: true` in conf/optim/ and conf/scheduler/)
        completed in `configure_optimizers`; None for a module that only evaluates. `concepts`: the caption-word vocabulary of the concept loss (`mmqa.data.concepts`; no concept
        head when it is empty or `loss_weights["concepts"]` is 0); `ingredients`: the ingredient
        vocabulary (empty without recipe data); `recipe`: the
        `ingredient_threshold`, `prompt_threshold`, `ban_absent_ingredients` and the recipe `generation`
        kwargs (conf/train.yaml). `distiller`: a teacher whose KL terms join the training losses
        (mmqa/compress/distill.py), weighted by `distill` in conf/train.yaml. `lr_scale`: tower ->
        factor on the learning rate of its own weights (a pretrained tower learns slower than the
        new parts; LoRA adapters are new weights and keep the full rate). `family_weight`: question
        family -> factor on its questions' VQA loss (the others keep 1); each family must be one of
        `families`."""
        super().__init__()
        unknown = set(loss_weights) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown loss term(s) {sorted(unknown)} in loss weights; valid: {list(TASKS)}")
        self.model = model
        self.answers = answers
        self.families = families
        self.dec_tok = decoder_tokenizer
        self.loss_weights = {t: float(loss_weights.get(t, 0.0)) for t in TASKS}
        self.distiller = distiller  # a plain object: the teacher is not a submodule (not trained, not saved)
        if distiller is not None:
            self.loss_weights |= distiller.weights
        self.make_optimizer, self.make_scheduler = optimizer, scheduler
        self.lr_scale = dict(lr_scale or {})
        self.family_weight = {f: float(w) for f, w in (family_weight or {}).items()}
        unknown = sorted(set(self.family_weight) - set(families))
        if unknown:
            raise MMQAError(f"data.vqa_family_weight: {unknown} is not a question family of this data; "
                            f"its families: {', '.join(families) or 'none'}")
        self.generation = dict(generation)
        self.max_caption_eval_images = max_caption_eval_images
        self.ingredients = list(ingredients)
        self.concepts = list(concepts)
        # which caption words an image's patches show: trains the image encoder, not used at inference
        self.concept_head = (
            PatchSetHead(model.dim, len(self.concepts), model.head_mlp_ratio, model.dropout)
            if self.concepts and self.loss_weights["concepts"] > 0
            else None
        )
        self.recipe = RecipeSettings.of(recipe)
        self.clip_loss = ClipLoss()
        for split in ("val", "test"):
            setattr(self, f"{split}_vqa", VQAAccuracy(families))
            setattr(self, f"{split}_captions", CaptionScores())
            setattr(self, f"{split}_retrieval", RetrievalRecall())
            setattr(self, f"{split}_ingredients", IngredientScores(self.recipe.ingredient_threshold))
            setattr(self, f"{split}_recipe_bleu", CaptionScores())  # of the instructions
            setattr(self, f"{split}_hallucination", HallucinationRate())
            setattr(self, f"{split}_recipe_nll", torchmetrics.MeanMetric())  # per recipe token -> perplexity
        self._captioned = 0  # images captioned so far this validation epoch
        self._recipes_written = 0  # and recipes written

    # ----------------------------------------------------------------------------- losses
    def compute_losses(self, batch: Batch) -> tuple[dict[str, torch.Tensor], dict]:
        """Every enabled loss whose labels are in the batch; also the intermediate outputs for metrics."""
        w = self.loss_weights
        m = self.model
        img = m.encode_images(batch.images)  # tokens (B, N, D)
        losses, out = {}, {"img": img}
        if batch.num_questions and (w["vqa"] > 0 or not self.training):
            q = m.encode_text(batch.q_input_ids, batch.q_attention_mask)
            logits, _ = m.answer_logits(img, batch.q_img_idx, q)  # (Q, K)
            losses["vqa"] = summed_bce(logits, batch.vqa_targets, self.question_weight(batch))
            out["vqa_logits"] = logits
        distill = self.distiller is not None and self.training
        if batch.num_captions and (w["caption"] > 0 or not self.training):
            caption = m.lm_loss(img, batch.c_img_idx, batch.c_dec_input_ids, batch.c_dec_attention_mask,
                                batch.c_dec_labels, return_logits=distill)
            if distill:
                losses["caption"], out["caption_logits"] = caption  # (C, L, V) for the teacher's KL
            else:
                losses["caption"] = caption
        if batch.num_recipes and (w["recipe"] > 0 or not self.training):
            losses["recipe"] = m.lm_loss(img, batch.r_img_idx, batch.r_input_ids, batch.r_attention_mask, batch.r_labels)
        if m.ingredient_head is not None and batch.has_ingredients.any() and (w["ingredients"] > 0 or not self.training):
            logits = m.ingredient_logits(img)[batch.has_ingredients]  # (B', I)
            target = batch.ingredient_targets[batch.has_ingredients]
            losses["ingredients"] = summed_bce(logits, target)
            out["ingredient_probs"], out["ingredient_targets"] = logits.sigmoid(), target
        if self.concept_head is not None and batch.has_concepts.any():
            logits = self.concept_head(img.tokens, img.mask)[batch.has_concepts]  # (B', V)
            losses["concepts"] = summed_bce(logits, batch.concept_targets[batch.has_concepts])
        has_caption = batch.clip_caption >= 0  # (B,)
        if has_caption.sum() >= 2 and (w["contrastive"] > 0 or not self.training):
            c = m.encode_text(batch.c_input_ids, batch.c_attention_mask)
            img_emb = m.embed_image(img)  # (B, E)
            txt_emb = m.embed_text(c)  # (C, E)
            pair_img = img_emb[has_caption]
            pair_txt = txt_emb[batch.clip_caption[has_caption]]  # (B', E)
            scale = m.contrastive.logit_scale.exp().clamp(max=100.0)
            losses["contrastive"] = self.clip_loss(pair_img, pair_txt, scale)
            out["img_emb"], out["txt_emb"] = img_emb, txt_emb
        if distill:  # the teacher's answer and caption distributions, as well as the labels
            losses |= self.distiller.losses(batch, out)
        return losses, out

    def question_weight(self, batch: Batch) -> torch.Tensor | None:  # (Q,) or None
        """Each question's factor on the VQA loss, from its family (`family_weight`); None when all are 1."""
        if not self.family_weight:
            return None
        w = [self.family_weight.get(f, 1.0) for f in batch.q_families]
        return torch.tensor(w, dtype=batch.vqa_targets.dtype, device=batch.vqa_targets.device)

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.loss_weights[k] * v for k, v in losses.items() if self.loss_weights[k] > 0)

    # ----------------------------------------------------------------------------- steps
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        losses, _ = self.compute_losses(batch)
        if not any(self.loss_weights[k] > 0 for k in losses):
            on = [k for k, w in self.loss_weights.items() if w > 0]
            raise MMQAError(
                f"batch {batch_idx} has no labels for any enabled loss ({', '.join(on)}): this data has "
                f"{', '.join(sorted(losses)) or 'none of them'}; enable a loss the data has labels for (conf/loss/)"
            )
        loss = self.total_loss(losses)
        if not torch.isfinite(loss):  # never train through a NaN/inf: stop and say which term broke
            bad = [k for k, v in losses.items() if not torch.isfinite(v)]
            raise NonFiniteLossError(
                f"non-finite loss at step {self.global_step} (batch {batch_idx}): "
                + ", ".join(f"{k}={losses[k].item()}" for k in bad)
                + "; lower optim.lr, or check the data of this batch"
            )
        B = len(batch.images)
        for k, v in losses.items():
            self.log(f"train/{k}_loss", v, batch_size=B)
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        return loss

    def _eval_step(self, batch: Batch, split: str) -> None:
        losses, out = self.compute_losses(batch)
        B = len(batch.images)
        for k, v in losses.items():
            self.log(f"{split}/{k}_loss", v, batch_size=B, sync_dist=True)
        if "vqa_logits" in out:
            preds = [self.answers[i] for i in out["vqa_logits"].argmax(-1).tolist()]
            getattr(self, f"{split}_vqa").update(preds, batch.q_answers, batch.q_families)
        if "img_emb" in out:
            getattr(self, f"{split}_retrieval").update(
                batch.image_ids, out["img_emb"], batch.image_ids[batch.c_img_idx], out["txt_emb"]
            )
        self._score_captions(batch, out["img"], split)
        if "recipe" in losses:
            tokens = (batch.r_labels[:, 1:] != -100).sum()  # GPT-2 predicts labels shifted by one
            getattr(self, f"{split}_recipe_nll").update(losses["recipe"], weight=tokens)
        if "ingredient_probs" in out:
            getattr(self, f"{split}_ingredients").update(out["ingredient_probs"], out["ingredient_targets"])
            self._score_recipes(batch, out["img"], split)

    def _eval_rows(self, rows: list[int], done: int, split: str) -> list[int]:
        """The rows still to generate for this epoch: validation stops at `max_caption_eval_images`."""
        if split != "val":
            return rows
        return rows[: max(0, self.max_caption_eval_images - done)]

    def _subset(self, img, rows: list[int]):
        return img.take(torch.tensor(rows, device=self.device))

    def _score_recipes(self, batch: Batch, img, split: str) -> None:
        """Write recipes from the predicted ingredients: BLEU-4 of the instructions, and the share of
        recipes naming an ingredient the dish does not show."""
        rows = self._eval_rows([i for i, r in enumerate(batch.recipes) if r], self._recipes_written, split)
        if not rows:
            return
        self._recipes_written += len(rows)
        sub = self._subset(img, rows)
        _, sets = predict_ingredients(self.model, sub, self.ingredients, self.recipe.prompt_threshold)
        banned = self.recipe.banned_from(self.ingredients)
        texts = write_recipes(self.model, self.dec_tok, sub, sets, banned, **self.recipe.generation)
        parsed = [parse_recipe(t) for t in texts]
        ids = [f"{split}-recipe-{batch.image_ids[i].item()}" for i in rows]
        refs = [[" ".join(batch.recipes[i]["steps"])] for i in rows]
        getattr(self, f"{split}_recipe_bleu").update(ids, [" ".join(p["steps"]) for p in parsed], refs)
        named = [set(ingredient_names(t, self.ingredients)) for t in texts]
        getattr(self, f"{split}_hallucination").update(named, [set(batch.ingredients[i]) for i in rows])

    def _score_captions(self, batch: Batch, img, split: str) -> None:
        rows = self._eval_rows([i for i, r in enumerate(batch.refs) if r], self._captioned, split)
        if not rows:
            return
        self._captioned += len(rows)
        sub = self._subset(img, rows)
        hyps = generate_captions(self.model, self.dec_tok, sub, **self.generation)
        ids = [f"{split}-{batch.image_ids[i].item()}" for i in rows]
        getattr(self, f"{split}_captions").update(ids, hyps, [batch.refs[i] for i in rows])

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _epoch_end(self, split: str) -> None:
        self._captioned = self._recipes_written = 0
        for name, logged in EPOCH_METRICS.items():
            metric = getattr(self, f"{split}_{name}")
            if metric.update_count:
                self.log_dict({f"{split}/{k}": v for k, v in logged(metric.compute()).items()})
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    # ----------------------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        if self.make_optimizer is None or self.make_scheduler is None:
            raise MMQAError("this LitMMQA was built to evaluate, without an optimizer and scheduler; "
                            "build it with mmqa.build.build_lit_module(cfg, model, dm, train=True)")
        check_towers(self.model, self.lr_scale, "lr_scale")
        groups: dict[tuple[float, bool], list] = {}  # (learning-rate factor, decayed) -> parameters
        for name, p in self.named_parameters():  # the model's and the concept head's
            if p.requires_grad:
                parts = name.split(".")
                scale = 1.0 if ".lora_" in name or parts[0] != "model" else self.lr_scale.get(parts[1], 1.0)
                # norms, biases, embeddings' scalars and the temperature are not decayed
                groups.setdefault((scale, p.ndim >= 2), []).append(p)
        opt = self.make_optimizer(params=[{"params": ps, "lr_scale": scale} | ({} if decay else {"weight_decay": 0.0})
                                          for (scale, decay), ps in sorted(groups.items(), key=_group_order)])
        for group in opt.param_groups:  # before the schedule reads each group's base rate
            group["lr"] *= group["lr_scale"]
        sched = self.make_scheduler(optimizer=opt, num_training_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _group_order(item) -> tuple[bool, bool]:
    """The full-rate groups first, decayed before not decayed: the two groups of a run without
    `lr_scale`, in the order checkpoints of earlier runs stored them."""
    (scale, decay), _ = item
    return scale != 1.0, not decay
