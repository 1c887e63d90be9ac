"""Where is the answer formed? The logit lens for VQA: the fusion's output after every layer is read out
the way the last layer's is (`fusion.readout`: the final norm and pooling) and put through the VQA
head; the accuracy of those answers per layer and per question family shows at which depth each kind
of question is settled. Late fusion has no layers, and says so.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from mmqa.inspect.maps import InspectError
from mmqa.metrics.vqa import VQAAccuracy


def fusion_layers(fusion) -> list:
    """The blocks whose outputs the VQA head can read: cross fusion's text blocks, early fusion's blocks."""
    for name in ("text_blocks", "blocks"):
        if hasattr(fusion, name) and hasattr(fusion, "readout"):
            return list(getattr(fusion, name))
    raise InspectError(f"{type(fusion).__name__} has no layers to read (late fusion pools each modality and "
                       f"fuses them in one MLP); the logit lens needs model/fusion=cross or early")


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
