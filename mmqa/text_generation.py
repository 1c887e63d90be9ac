"""Text generation from image tokens: one function that the LightningModule (validation captions),
`Bundle.caption` and the demo all call, and `stream_text`, which shows the same text as it is written."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import torch
from transformers import TextIteratorStreamer

from mmqa.models.mmqa_model import MMQAModel
from mmqa.models.outputs import EncoderOutput


@torch.no_grad()
def generate_captions(model: MMQAModel, tokenizer, img: EncoderOutput, **generate_kwargs) -> list[str]:
    """img tokens (B, N, D) -> B strings; kwargs go to transformers' `generate` (num_beams, do_sample,
    temperature, top_k, top_p, max_new_tokens, streamer, ...)."""
    prompt = torch.full((len(img.tokens), 1), tokenizer.bos_token_id, dtype=torch.long, device=img.tokens.device)
    ids = model.generate(img, prompt, **generate_kwargs)  # (B, 1 + new)
    return tokenizer.batch_decode(ids[:, 1:], skip_special_tokens=True)


def stream_text(generate: Callable[..., str], tokenizer) -> Iterator[str]:
    """The text so far, each time `generate` (one text, e.g. `partial(bundle.caption, image, **options)`)
    writes a word. `generate(streamer=...)` runs in a worker thread and feeds a transformers
    `TextIteratorStreamer`; the last value yielded is what `generate` returned, so whoever keeps only
    the last value gets exactly the text of a call without streaming. An exception raised in the
    worker is raised here. Beam search cannot stream (transformers refuses): call `generate` directly."""
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    done: dict = {}

    def work():
        try:
            done["text"] = generate(streamer=streamer)
        except BaseException as e:  # handed to the reader below
            done["error"] = e
            streamer.end()  # wakes the reader, which would otherwise wait for the next word forever

    worker = threading.Thread(target=work, name="mmqa-generate", daemon=True)
    worker.start()
    text = ""
    for piece in streamer:
        if piece:
            text += piece
            yield text
    worker.join()
    if "error" in done:
        raise done["error"]
    yield done["text"]
