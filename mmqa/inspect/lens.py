"""Where is the answer formed, and where the caption's next word? The logit lens, read out of the
fusion and out of the decoder.

- VQA (`logit_lens`): the fusion's output after every layer is read out the way the last layer's is
  (`fusion.readout`: the final norm and pooling) and put through the VQA head; the accuracy of those
  answers per layer and per question family shows at which depth each kind of question is settled.
  Late fusion has no layers, and says so.
- Captions (`decoder_lens`): the hidden state after every GPT-2 block of the caption decoder is read
  through its final layer norm `ln_f` and LM head, as GPT-2 reads its last block, on the split's
  teacher-forced captions; per layer, the next-token accuracy and cross-entropy over the labelled
  positions. The last layer's row is the model's own.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from mmqa.inspect.maps import InspectError
from mmqa.metrics.vqa import VQAAccuracy


def fusion_layers(fusion, needed_by: str = "the logit lens") -> list:
    """The blocks whose outputs the VQA head can read: cross fusion's text blocks, early fusion's blocks."""
    for name in ("text_blocks", "blocks"):
        if hasattr(fusion, name) and hasattr(fusion, "readout"):
            return list(getattr(fusion, name))
    raise InspectError(f"{type(fusion).__name__} has no layers to read (late fusion pools each modality and "
                       f"fuses them in one MLP); {needed_by} needs model/fusion=cross or early")


@torch.no_grad()
def logit_lens(lit, batches: Iterable) -> list[dict]:
    """One row per fusion layer: VQA accuracy overall and per family when the head reads that layer."""
    lit.eval()
    model = lit.model
    layers = fusion_layers(model.fusion)
    metrics = [VQAAccuracy(lit.test_vqa.families) for _ in layers]
    outputs: list[torch.Tensor] = []
    hooks = [blk.register_forward_hook(lambda m, a, out: outputs.append(out[0])) for blk in layers]
    try:
        for batch in batches:
            img = model.encode_images(batch.images)
            q = model.encode_text(batch.q_input_ids, batch.q_attention_mask)
            outputs.clear()
            model.answer_logits(img, batch.q_img_idx, q)
            # a bidirectional cross fusion also runs image blocks, which are not among `layers`
            for metric, x in zip(metrics, outputs[: len(layers)]):
                logits = model.vqa_head(model.fusion.readout(x, q.mask))
                metric.update([lit.answers[i] for i in logits.argmax(-1).tolist()], batch.q_answers, batch.q_families)
    finally:
        for h in hooks:
            h.remove()
    return [{"layer": i, **{k: float(v) for k, v in m.compute().items()}} for i, m in enumerate(metrics)]


@torch.no_grad()
def decoder_lens(lit, batches: Iterable) -> list[dict]:
    """One row per decoder layer: next-token accuracy and cross-entropy (nats per token, over every
    labelled position of the batches' captions) when `ln_f` and the LM head read that layer's output.
    Empty when the batches hold no captions."""
    lit.eval()
    model = lit.model
    gpt2 = model.decoder.gpt2
    blocks = list(gpt2.transformer.h)
    correct = torch.zeros(len(blocks), dtype=torch.long)
    nll = torch.zeros(len(blocks), dtype=torch.float64)
    tokens = 0
    outputs: list[torch.Tensor] = []
    hooks = [blk.register_forward_hook(lambda m, a, out: outputs.append(out)) for blk in blocks]
    try:
        for batch in batches:
            if not batch.num_captions:
                continue
            img = model.encode_images(batch.images)
            outputs.clear()
            model.lm_loss(img, batch.c_img_idx, batch.c_dec_input_ids, batch.c_dec_attention_mask, batch.c_dec_labels)
            target = batch.c_dec_labels[:, 1:]  # (C, L - 1): the token each position predicts
            keep = target != -100
            for i, x in enumerate(outputs):  # x (C, L, E): block i's output
                logits = gpt2.lm_head(gpt2.transformer.ln_f(x))[:, :-1][keep].float()  # (n, V)
                nll[i] += F.cross_entropy(logits, target[keep], reduction="sum").double()
                correct[i] += int((logits.argmax(-1) == target[keep]).sum())
            tokens += int(keep.sum())
    finally:
        for h in hooks:
            h.remove()
    if not tokens:
        return []
    return [{"layer": i, "accuracy": int(correct[i]) / tokens, "loss": float(nll[i]) / tokens, "tokens": tokens}
            for i in range(len(blocks))]
