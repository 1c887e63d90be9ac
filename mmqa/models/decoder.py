"""The caption / recipe decoder: transformers' `GPT2LMHeadModel` with cross-attention layers that
read the image tokens. Training uses GPT-2's own shifted LM loss (labels of -100 are ignored);
generation goes through transformers' `generate` (greedy, beam search, sampling, KV cache).

`cache_implementation="static"` (a `generate` option, so a `generation` key of the config) preallocates
the KV cache, and transformers then compiles the decoding step with `torch.compile` — on CUDA only,
by its own rule; here on every device, as each step's Python overhead is most of a small decoder's
time on a CPU (`disable_compile=True` keeps the static cache uncompiled). Compiling takes seconds on
the first call for each batch size and length; later calls reuse it.

`generate` drops an all-ones attention mask (no padding) and, once one caption of a batch has ended,
feeds that row pad tokens without a mask; GPT-2 then warns "We strongly recommend passing in an
`attention_mask`". The rows it warns about are finished and their outputs discarded, so while
`generate` runs this module filters that one message out of transformers' log (`_quiet_pad_warning`);
anything else in the process keeps the warning."""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn
from transformers import CompileConfig, GPT2Config, GPT2LMHeadModel

from mmqa.models.pretrained import load_pretrained

PAD_WARNING = "We strongly recommend passing in an `attention_mask`"


def _drop_generate_pad_warning(record: logging.LogRecord) -> bool:
    """A logging filter: False for GPT-2's padding warning (see the module docstring), True otherwise."""
    return PAD_WARNING not in record.getMessage()


@contextlib.contextmanager
def _quiet_pad_warning():
    """transformers' log without GPT-2's padding warning for the duration of the block."""
    log, drop = logging.getLogger("transformers.modeling_utils"), _drop_generate_pad_warning
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


class GPT2Decoder(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        context_dim: int,
        width: int,
        depth: int,
        heads: int,
        max_length: int,
        dropout: float,
        bos_token_id: int,
        eos_token_id: int,
        pad_token_id: int,
        pretrained: str | None = None,
    ):
        super().__init__()
        if pretrained:
            self.gpt2 = load_pretrained(
                pretrained,
                "decoder",
                # cross-attention layers are new: transformers initialises them randomly
                lambda src: GPT2LMHeadModel.from_pretrained(src, add_cross_attention=True, attn_implementation="sdpa"),
            )
        else:
            config = GPT2Config(
                vocab_size=vocab_size,
                n_positions=max_length,
                n_embd=width,
                n_layer=depth,
                n_head=heads,
                resid_pdrop=dropout,
                embd_pdrop=dropout,
                attn_pdrop=dropout,
                activation_function="gelu_pytorch_tanh",  # GPT-2's tanh GELU, as one fused PyTorch op
                add_cross_attention=True,
                bos_token_id=bos_token_id,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
            )
            self.gpt2 = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
        self.gpt2.loss_type = "ForCausalLM"  # GPT-2's shifted LM loss, named (transformers cannot tell it from the class name)
        self.context_proj = nn.Linear(context_dim, self.gpt2.config.n_embd)

    def loss(
        self,
        context: torch.Tensor,  # (C, N, Dc) image tokens, one row per caption
        input_ids: torch.Tensor,  # (C, L) bos + caption + eos, padded
        attention_mask: torch.Tensor,  # (C, L)
        labels: torch.Tensor,  # (C, L) input_ids with padding set to -100
        return_logits: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The LM loss; with `return_logits`, (loss, logits (C, L, V)) (distillation reads them)."""
        out = self.gpt2(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=self.context_proj(context),
            labels=labels,
        )
        return (out.loss, out.logits) if return_logits else out.loss

    @torch.no_grad()
    def generate(
        self,
        context: torch.Tensor,
        prompt_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """context (B, N, Dc), prompt_ids (B, P), left-padded where the mask (B, P) is 0 -> ids (B, P + new)."""
        if generate_kwargs.get("cache_implementation") == "static" and "compile_config" not in generate_kwargs:
            generate_kwargs["compile_config"] = compile_everywhere(self.gpt2.device.type)
        with _quiet_pad_warning():
            return self.gpt2.generate(
                input_ids=prompt_ids,
                attention_mask=torch.ones_like(prompt_ids) if attention_mask is None else attention_mask,
                encoder_hidden_states=self.context_proj(context),
                pad_token_id=self.gpt2.config.pad_token_id,
                eos_token_id=self.gpt2.config.eos_token_id,
                **generate_kwargs,
            )


def compile_everywhere(device: str) -> CompileConfig:
    """transformers' compile settings for a static-cache decoding step, on any device: one graph per
    shape (`dynamic=False`: a static cache fixes them), inductor's default mode (its CUDA-graph
    "reduce-overhead" default has nothing to capture on a CPU)."""
    config = CompileConfig(dynamic=False, mode="reduce-overhead" if device == "cuda" else "default")
    config._compile_all_devices = True  # transformers' own switch past its CUDA-only rule
    return config
