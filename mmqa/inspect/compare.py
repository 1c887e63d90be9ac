"""Compare two checkpoints of one architecture on the same probe batches (a pretrained tower before
and after fine-tuning; epoch 1 against the best epoch):

- per attention site and head, the Jensen–Shannon divergence (base 2: 0 = the same weights, 1 = no
  overlap) between the two models' attention rows, averaged over real queries, and each model's
  normalised entropy (`statistics.attention_entropy`);
- per block, linear CKA (Kornblith et al. 2019) between the two models' block outputs over every token
  (1 = the same representation up to rotation and scale);
- per word of the text encoder's vocabulary, the attention it receives in the text encoder (mean over
  layers, heads and the queries that see it) under each model: which words gained attention.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

import torch

from mmqa.inspect.capture import STACKS, block_of, capture_attention, find_blocks
from mmqa.inspect.heads import head_counts
from mmqa.inspect.maps import InspectError
from mmqa.inspect.statistics import attention_entropy


def check_comparable(a, b) -> None:
    """Raise InspectError unless bundles `a` and `b` have the same attention layout and text vocabulary."""
    ca, cb = head_counts(a.model), head_counts(b.model)
    if ca != cb:
        only = sorted(set(ca.items()) ^ set(cb.items()))
        raise InspectError(f"the two bundles differ in architecture (attention sites and heads): {only[:6]}; "
                           f"compare checkpoints of one model")
    if a.text_tokenizer.get_vocab() != b.text_tokenizer.get_vocab():
        raise InspectError("the two bundles tokenise text differently, so their maps over words cannot be "
                           "compared; compare checkpoints that share a text tokenizer")


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # (..., N) rows summing to 1 -> (...)
    m = (p + q) / 2

    def kl(x):
        return torch.where(x > 0, x * (x / m.clamp_min(1e-30)).clamp_min(1e-30).log2(), torch.zeros_like(x)).sum(-1)
    return (kl(p) + kl(q)) / 2


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:  # (n, d1), (n, d2)
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()).clamp_min(1e-30))


@torch.no_grad()
def compare(lit_a, lit_b, batches: Iterable, tokenizer) -> dict:
    """{"heads": [{site, head, js, entropy_a, entropy_b}], "cka": [{block, cka}], "words": [{word,
    attention_a, attention_b, gain}]} over `batches`."""
    lit_a.eval(), lit_b.eval()
    js, ent_a, ent_b, n = (collections.defaultdict(float) for _ in range(4))
    outs: dict[str, list[list[torch.Tensor]]] = collections.defaultdict(lambda: [[], []])
    received: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for batch in batches:
        runs = []
        for side, lit in enumerate((lit_a, lit_b)):
            def keep(block, side=side):
                return lambda m, a, out: outs[block][side].append((out[0] if isinstance(out, tuple) else out).flatten(0, -2))
            hooks = [m.register_forward_hook(keep(block_of(name + ".x")))
                     for name, m in find_blocks(lit.model, set(STACKS.values()))]
            with capture_attention(lit.model) as calls:
                lit.compute_losses(batch)
            for h in hooks:
                h.remove()
            runs.append(calls)
        seen: collections.Counter = collections.Counter()  # the text encoder reads questions, then captions
        for ca, cb in zip(*runs, strict=True):
            occurrence, seen[ca.site] = seen[ca.site], seen[ca.site] + 1
            wa, wb = ca.weights(), cb.weights()  # (B, h, T, N)
            text = None
            if ca.stack == "text" and wa.shape[2] == wa.shape[3]:  # questions first, then captions
                ids, mask = ((batch.q_input_ids, batch.q_attention_mask), (batch.c_input_ids, batch.c_attention_mask))[occurrence]
                text = (ids, mask.bool())
            real = text[1] if text is not None else ca.query_mask
            real = torch.ones(wa.shape[0], wa.shape[2], dtype=torch.bool) if real is None else real  # (B, T)
            d = (js_divergence(wa, wb) * real[:, None]).sum((0, 2))  # (h,)
            for h in range(wa.shape[1]):
                js[(ca.site, h)] += float(d[h])
                n[(ca.site, h)] += float(real.sum())
            ea, eb = attention_entropy(wa, ca.visible, ca.query_mask), attention_entropy(wb, cb.visible, cb.query_mask)
            for h in range(wa.shape[1]):
                ent_a[(ca.site, h)] += float(ea[h]) * float(real.sum())
                ent_b[(ca.site, h)] += float(eb[h]) * float(real.sum())
            if text is not None:
                ids, mask = text
                # (B, N): the attention each token receives, mean over heads and the real queries
                got_a, got_b = ((w * mask[:, None, :, None]).sum(2).mean(1) / mask.sum(1, keepdim=True) for w in (wa, wb))
                for row, token_ids in enumerate(ids.tolist()):
                    for j, t in enumerate(token_ids):
                        if mask[row, j]:
                            word = tokenizer.convert_ids_to_tokens(t)
                            r = received[word]
                            r[0], r[1], r[2] = r[0] + float(got_a[row, j]), r[1] + float(got_b[row, j]), r[2] + 1
    heads = [{"site": s, "head": h, "js": js[(s, h)] / n[(s, h)], "entropy_a": ent_a[(s, h)] / n[(s, h)],
              "entropy_b": ent_b[(s, h)] / n[(s, h)]} for (s, h) in js]
    cka = [{"block": block, "cka": linear_cka(torch.cat(a), torch.cat(b))} for block, (a, b) in outs.items()]
    words = sorted(({"word": w, "count": c, "attention_a": sa / c, "attention_b": sb / c, "gain": (sb - sa) / c}
                    for w, (sa, sb, c) in received.items()), key=lambda r: -r["gain"])
    return {"heads": heads, "cka": cka, "words": words}
