"""Knowledge distillation (Hinton et al. 2015): a student model trained against a teacher bundle's
soft answer distribution and its caption token distributions, as well as the true labels.

`python train.py experiment=distill distill.teacher=<run>/bundle` trains a student half as deep as
the default (conf/experiment/distill.yaml) on the teacher's tokenizers and answer vocabulary;
`LitMMQA` adds the `Distiller`'s terms to its losses while training. The teacher runs in eval mode
without gradients and is no part of the student's module tree, optimiser, checkpoints or bundle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmqa.data.batch import Batch
from mmqa.models.mmqa_model import MMQAModel


def soft_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t / T) || softmax(s / T)) summed over the last axis, averaged over rows, times T²
    (which keeps the gradient's size independent of T). (R, K), (R, K) -> ()"""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def binary_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(Bernoulli(σ(t / T)) || Bernoulli(σ(s / T))) summed over the last axis, averaged over rows,
    times T²: the distillation term for a head of independent per-answer sigmoids (mmqa's VQA head is
    trained with soft-score BCE), where each answer's probability is its own. (R, K), (R, K) -> ()"""
    t, s = teacher_logits.float() / temperature, student_logits.float() / temperature
    p = torch.sigmoid(t)
    kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))  # (R, K)
    return kl.sum(-1).mean() * temperature**2


VQA_FORMS = {"softmax": soft_kl, "binary": binary_kl}  # distill.vqa_form: how the answer logits are read


class Distiller:
    """The teacher's side of distillation: its outputs on a batch, and the KL terms against the
    student's (`distill_vqa` over the answer vocabulary, as one softmax or per answer, `distill_caption` over the decoder vocabulary
    at every caption position that has a label)."""

    def __init__(self, teacher: MMQAModel, temperature: float, vqa: float, caption: float, vqa_form: str = "softmax",
                 text_cache: int = 0):
        """`text_cache`: distinct question rows whose teacher text encoding is kept (the whole teacher is
        frozen, so its text tower's outputs never change; 0: encoded every step)."""
        if temperature <= 0:
            raise ValueError(f"distill.temperature={temperature}: must be > 0")
        if vqa_form not in VQA_FORMS:
            raise ValueError(f"distill.vqa_form={vqa_form!r}: not an option; valid: {', '.join(VQA_FORMS)}")
        self.vqa_kl = VQA_FORMS[vqa_form]
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher.cache_text_if_frozen(text_cache)
        self.temperature = temperature
        self.weights = {"distill_vqa": float(vqa), "distill_caption": float(caption)}

    @torch.no_grad()
    def _teacher(self, batch: Batch, vqa: bool, caption: bool) -> dict[str, torch.Tensor]:
        t = self.teacher.to(batch.images.device)
        img = t.encode_images(batch.images)
        out = {}
        if vqa:
            q = t.encode_text(batch.q_input_ids, batch.q_attention_mask)
            out["vqa"] = t.answer_logits(img, batch.q_img_idx, q)[0]  # (Q, K)
        if caption:
            out["caption"] = t.lm_loss(img, batch.c_img_idx, batch.c_dec_input_ids, batch.c_dec_attention_mask,
                                       batch.c_dec_labels, return_logits=True)[1]  # (C, L, V)
        return out

    def losses(self, batch: Batch, student: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The distillation terms for the student's outputs `student` ("vqa_logits", "caption_logits")."""
        vqa = "vqa_logits" in student and self.weights["distill_vqa"] > 0
        caption = "caption_logits" in student and self.weights["distill_caption"] > 0
        teacher = self._teacher(batch, vqa, caption)
        out = {}
        if vqa:
            out["distill_vqa"] = self.vqa_kl(teacher["vqa"], student["vqa_logits"], self.temperature)
        if caption:
            labelled = batch.c_dec_labels[:, 1:] != -100  # (C, L-1): position i predicts token i + 1
            out["distill_caption"] = soft_kl(teacher["caption"][:, :-1][labelled],
                                             student["caption_logits"][:, :-1][labelled], self.temperature)
        return out
