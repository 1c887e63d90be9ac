"""Each speed path gives what the plain path gives: a static KV cache (and compiled decoding) the same
greedy tokens as transformers' dynamic cache, bf16 autocast losses within a stated tolerance of fp32,
compiled towers the eager outputs. Their speed is measured in benchmarks/, never here."""

from __future__ import annotations

import pytest
import torch

BF16_REL_TOL = 0.02  # bf16 keeps 8 bits of mantissa: about 0.4% per rounding, a few percent over a model


def _varied(model):
    """An untrained GPT-2 repeats its start token whatever it reads; larger random weights make its
    greedy choices depend on the image, so equal tokens mean something."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.decoder.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.5)
    return model.eval()


def _generate(model, batch, **kw):
    img = model.encode_images(batch.images[:4])
    bos = model.decoder.gpt2.config.bos_token_id
    prompt = torch.full((4, 1), bos)
    return model.generate(img, prompt, max_new_tokens=8, min_new_tokens=8, **kw)  # (4, 9)


def test_static_cache_decodes_the_dynamic_cache_tokens(tiny_parts):
    _, _, model, _, batch = tiny_parts()
    model = _varied(model)
    with torch.no_grad():
        for beams in (1, 2):
            dynamic = _generate(model, batch, num_beams=beams)
            static = _generate(model, batch, num_beams=beams, cache_implementation="static", disable_compile=True)
            assert dynamic.shape == (4, 9)
            assert len(set(dynamic[:, 1:].flatten().tolist())) > 1  # not one repeated token
            assert torch.equal(static, dynamic), beams


def test_bf16_autocast_losses_stay_within_tolerance_of_fp32(tiny_parts):
    _, _, _, lit, batch = tiny_parts()
    lit.eval()
    with torch.no_grad():
        fp32, _ = lit.compute_losses(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16, _ = lit.compute_losses(batch)
    assert set(bf16) == set(fp32) and len(fp32) >= 4  # every loss term of the default config
    for name, value in fp32.items():
        assert bf16[name].dtype == torch.float32 or bf16[name].dtype == torch.bfloat16
        assert abs(bf16[name].float().item() - value.item()) <= BF16_REL_TOL * abs(value.item()) + 1e-3, name
    assert abs(lit.total_loss(bf16).float().item() - lit.total_loss(fp32).item()) <= BF16_REL_TOL * lit.total_loss(fp32).item()


@pytest.mark.slow
def test_compiled_static_decoding_gives_the_eager_tokens(tiny_parts):
    _, _, model, _, batch = tiny_parts()
    model = _varied(model)
    with torch.no_grad():
        dynamic = _generate(model, batch)
        compiled = _generate(model, batch, cache_implementation="static")  # compiled on the CPU (GPT2Decoder.generate)
    assert torch.equal(compiled, dynamic)
    assert getattr(model.decoder.gpt2, "_compiled_call", None) is not None  # transformers did compile the step


@pytest.mark.slow
def test_compiled_towers_give_the_eager_losses(tiny_parts):
    _, _, _, lit, batch = tiny_parts()
    lit.eval()
    with torch.no_grad():
        eager, _ = lit.compute_losses(batch)
        names = [n for n, _ in lit.model.named_parameters()]
        lit.model.compile_towers()
        compiled, _ = lit.compute_losses(batch)
    assert [n for n, _ in lit.model.named_parameters()] == names  # checkpoints and bundles unchanged
    for name, value in eager.items():
        torch.testing.assert_close(compiled[name], value, rtol=1e-4, atol=1e-5)
