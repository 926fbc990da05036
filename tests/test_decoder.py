"""The Memory Decoder model and its checkpoints (helpers.decoder), notebook 03."""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers.decoder import (SMALL_BATCH, DecoderConfig, DecoderMismatch, MemoryDecoder,
                             load_decoder, save_decoder)
from helpers.model import tokenizer_fingerprint
from tests.conftest import make_tokenizer
from tests.test_train_decoder import make_store

STORE_VOCAB = [3, 5, 8, 13, 21]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed=0, **knobs):
    """key_dim 32, width 32, 2 layers of 4 heads, over a 40-token base vocabulary."""
    torch.manual_seed(seed)
    knobs = {"key_dim": 32, "base_vocab_size": 40, "dim": 32, "n_layers": 2,
             "n_heads": 4, "window": 3, "vocab_ids": STORE_VOCAB,
             "base_model_name": "tiny-gemma", "layer": -1,
             "tokenizer_fingerprint": tokenizer_fingerprint(make_tokenizer()), **knobs}
    return MemoryDecoder(DecoderConfig(**knobs)).eval()


def inputs(B=4, W=3, D=32, seed=1):
    return torch.randn(B, W, D, generator=torch.Generator().manual_seed(seed))


def test_default_decoder_has_six_layers_of_32_heads_with_layer_norm():
    decoder = MemoryDecoder(DecoderConfig(key_dim=32, base_vocab_size=40, vocab_ids=[1, 2]))
    layers = decoder.encoder.layers
    assert len(layers) == 6 and decoder.config.dim == 256 and decoder.config.window == 1
    assert all(layer.self_attn.num_heads == 32 and layer.norm_first for layer in layers)
    assert isinstance(decoder.norm, torch.nn.LayerNorm)
    assert decoder.head.out_features == 2  # one column per stored next token
    assert decoder.count_parameters() == sum(p.numel() for p in decoder.parameters())


@pytest.mark.parametrize("knobs, advice", [
    ({"dim": 60, "n_heads": 32}, "not divisible by n_heads"),
    ({"window": 0}, "window must be >= 1"),
    ({"head": "dense"}, "head must be one of"),
    ({"vocab_ids": []}, "DecoderConfig.from_store"),
    ({"vocab_ids": [3, 99]}, "base_vocab_size"),
])
def test_config_errors_say_what_to_change(knobs, advice):
    with pytest.raises(ValueError, match=advice):
        DecoderConfig(**{"key_dim": 32, "base_vocab_size": 40, "vocab_ids": [3], **knobs})


def test_config_from_store_records_its_vocabulary_model_and_layer(tmp_path):
    store = make_store(tmp_path / "s")
    config = DecoderConfig.from_store(store, 40, window=2)
    assert config.vocab_ids == STORE_VOCAB and config.key_dim == 32
    assert (config.base_model_name, config.layer, config.window) == ("tiny-gemma", -1, 2)


def test_input_of_the_wrong_shape_names_the_expected_one():
    with pytest.raises(ValueError, match=r"\(B, 3, 32\)"):
        tiny()(inputs(W=2))


def test_earlier_window_states_change_the_output():
    decoder, x = tiny(), inputs()
    changed = x.clone()
    changed[:, 0] += 1.0
    with torch.no_grad():
        assert not torch.allclose(decoder(x), decoder(changed))


def test_padded_slots_do_not_change_the_output():
    decoder, x = tiny(), inputs()
    pad = torch.tensor([[True, True, False], [True, False, False]] + [[False] * 3] * 2)
    changed = x.clone()
    changed[0, :2], changed[1, 0] = 5.0, float("nan")
    with torch.no_grad():
        out, again = decoder(x, pad), decoder(changed, pad)
        assert torch.isfinite(again).all()
        torch.testing.assert_close(again, out, rtol=0, atol=1e-6)
        assert not torch.allclose(decoder(x), out)  # the mask did matter


def test_a_padded_window_reads_like_its_unpadded_part_alone():
    decoder, x = tiny(), inputs(B=1)
    with torch.no_grad():
        out = decoder(x, torch.tensor([[True, False, False]]))
        h = decoder.inp(x[:, 1:]) + decoder.pos[1:]  # slots 1, 2 only
        causal = torch.nn.Transformer.generate_square_subsequent_mask(2)
        h = decoder.norm(decoder.encoder(h, mask=causal, is_causal=True)[:, -1])
        torch.testing.assert_close(out, decoder.head(h))


@pytest.mark.parametrize("train", [False, True])
def test_the_last_layer_computes_only_the_last_position_as_the_full_layer_would(train):
    decoder = tiny(dropout=0.0).train(train)  # train mode: same path, gradients flow
    x = inputs()
    pad = torch.tensor([[True, False, False], [False] * 3, [True, True, False], [False] * 3])
    h = decoder.inp(torch.where(pad[..., None], 0.0, x)) + decoder.pos
    mask = decoder._attention_mask(pad, 4, 3, x.device)
    full = decoder.norm(decoder.encoder(h, mask=mask)[:, -1])  # every position, every layer
    fast = decoder.hidden(x, pad)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    if train:
        (fast * torch.randn_like(fast)).sum().backward()  # a plain sum of a LayerNorm is flat
        assert decoder.encoder.layers[-1].self_attn.in_proj_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("B", [1, SMALL_BATCH, SMALL_BATCH + 1])
def test_small_batches_run_the_written_out_layers_with_the_library_layers_numbers(B):
    """Up to SMALL_BATCH rows, inference skips nn.MultiheadAttention (_layer_inference);
    its outputs must be those of the library's layers, padding included."""
    from helpers import decoder as module
    decoder = tiny(dropout=0.0)
    x = inputs(B=B, seed=B)
    pad = torch.rand(B, 3, generator=torch.Generator().manual_seed(B)) < 0.4
    pad[:, -1] = False  # the predicting slot is always real
    h = decoder.inp(torch.where(pad[..., None], 0.0, x)) + decoder.pos
    mask = decoder._attention_mask(pad, B, 3, x.device)
    with torch.no_grad():
        want = decoder.norm(decoder.encoder(h, mask=mask)[:, -1])
        calls = []
        original = module._layer_inference
        module._layer_inference = lambda *a, **k: calls.append(1) or original(*a, **k)
        try:
            got = decoder.hidden(x, pad)
        finally:
            module._layer_inference = original
    assert len(calls) == (decoder.config.n_layers if B <= SMALL_BATCH else 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train", [False, True])
def test_a_one_state_window_computes_each_layer_as_the_full_layer_would(train):
    decoder = tiny(window=1, dropout=0.0).train(train)
    x = inputs(W=1)
    h = decoder.inp(x) + decoder.pos
    full = decoder.norm(decoder.encoder(h)[:, -1])  # nn.TransformerEncoder itself
    fast = decoder.hidden(x)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    if train:
        (fast * torch.randn_like(fast)).sum().backward()  # a plain sum of a LayerNorm is flat
        assert decoder.encoder.layers[0].self_attn.in_proj_weight.grad.abs().sum() > 0


def test_one_state_attention_dropout_drops_whole_heads_like_multihead_attention():
    """With one key, MultiheadAttention's dropout zeroes a head's value or scales it by
    1/(1-p); the direct W = 1 path must do the same, at the same rate."""
    from helpers.decoder import _one_position
    decoder = tiny(window=1, dropout=0.5).train()
    layer = decoder.encoder.layers[0]
    layer.dropout.p = layer.dropout1.p = layer.dropout2.p = 0.0  # only attention dropout
    with torch.no_grad():  # out_proj = identity, feed-forward = 0: output = h + dropped v
        layer.self_attn.out_proj.weight.copy_(torch.eye(32))
        layer.self_attn.out_proj.bias.zero_()
        layer.linear2.weight.zero_(), layer.linear2.bias.zero_()
        h = torch.randn(2000, 1, 32, generator=torch.Generator().manual_seed(2))
        dim = 32
        v = torch.nn.functional.linear(layer.norm1(h), layer.self_attn.in_proj_weight[2 * dim:],
                                       layer.self_attn.in_proj_bias[2 * dim:])
        v = v.reshape(2000, 4, 8)
        for out in (_one_position(layer, h), layer(h)):  # ours, then the library's
            got = (out - h).reshape(2000, 4, 8)
            dropped = got.abs().amax(-1) < 1e-6                       # (rows, heads)
            scaled = (got - 2 * v).abs().amax(-1) < 1e-4
            assert (dropped | scaled).all()
            assert 0.45 < dropped.float().mean() < 0.55


def test_store_head_puts_the_floor_outside_its_vocabulary():
    decoder = tiny()
    with torch.no_grad():
        logp = decoder.log_probs_full(inputs(), floor=-30.0)
    assert logp.shape == (4, 40)
    outside = [t for t in range(40) if t not in STORE_VOCAB]
    assert (logp[:, outside] == -30.0).all()
    torch.testing.assert_close(logp[:, STORE_VOCAB].exp().sum(1), torch.ones(4))


def test_full_head_log_probs_are_a_log_softmax_over_the_base_vocabulary():
    decoder = tiny(head="full")
    with torch.no_grad():
        logp = decoder.log_probs_full(inputs())
    assert logp.shape == (4, 40) and (logp > -30).all()
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(4))


def test_head_index_maps_base_token_ids_to_head_columns():
    assert tiny().head_index([3, 21, 4, -1, 99]).tolist() == [0, 4, -1, -1, -1]
    assert tiny(head="full").head_index([3, 39, 40]).tolist() == [3, 39, -1]


def test_saved_decoder_gives_identical_outputs_in_a_fresh_module(tmp_path):
    decoder, x = tiny(), inputs()
    save_decoder(decoder, tmp_path / "dec")
    assert sorted(p.name for p in (tmp_path / "dec").iterdir()) == ["config.json",
                                                                    "model.safetensors"]
    loaded = load_decoder(tmp_path / "dec", base_model_name="tiny-gemma",
                          tokenizer=make_tokenizer(), vocab_size=40)
    assert loaded is not decoder and loaded.config == decoder.config
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), decoder(x))


@pytest.mark.parametrize("given, field", [
    ({"base_model_name": "google/gemma-2b"}, "base_model_name"),
    ({"tokenizer": "other"}, "tokenizer_fingerprint"),
    ({"vocab_size": 262144}, "base_vocab_size"),
    ({"store": 16}, "key_dim"),
])
def test_load_refuses_a_checkpoint_made_for_another_setup(tmp_path, given, field):
    save_decoder(tiny(), tmp_path / "dec")
    if "tokenizer" in given:
        tok = make_tokenizer()
        tok.add_tokens(["unseen"])
        given = {"tokenizer": tok}
    if "store" in given:
        fp = tiny().config.tokenizer_fingerprint
        given = {"store": make_store(tmp_path / "s", dim=given["store"],
                                     tokenizer_fingerprint=fp)}
    with pytest.raises(DecoderMismatch, match=field) as err:
        load_decoder(tmp_path / "dec", **given)
    assert "03_train_memory_decoder" in str(err.value)


def test_missing_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_decoder"):
        load_decoder(tmp_path / "nowhere")


def test_hub_mixin_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    decoder, x = tiny(), inputs()
    decoder.save_pretrained(tmp_path / "hub")
    saved = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert saved["vocab_ids"] == STORE_VOCAB and saved["window"] == 3
    loaded = MemoryDecoder.from_pretrained(tmp_path / "hub")
    assert isinstance(loaded.config, DecoderConfig) and loaded.config == decoder.config
    with torch.no_grad():
        assert torch.equal(loaded(x), decoder(x))
    save_decoder(decoder, tmp_path / "ours")  # same layout both ways
    assert torch.equal(MemoryDecoder.from_pretrained(tmp_path / "ours")(x), loaded(x))


def test_tied_head_uses_the_attached_embedding_and_does_not_save_it(tmp_path):
    decoder, x = tiny(head="tied"), inputs()
    with pytest.raises(RuntimeError, match="attach_output_embedding"):
        decoder(x)
    embedding = torch.randn(40, 32)
    decoder.attach_output_embedding(embedding)
    with torch.no_grad():
        out = decoder(x)
        torch.testing.assert_close(out, decoder.head(decoder.hidden(x)) @ embedding.T)
    assert decoder.count_parameters() == sum(p.numel() for p in decoder.parameters())
    save_decoder(decoder, tmp_path / "dec")
    saved = load_file(tmp_path / "dec" / "model.safetensors")
    assert all(t.shape != embedding.shape for t in saved.values())
    assert "output_embedding" not in saved and "output_embedding" not in decoder.state_dict()
    loaded = load_decoder(tmp_path / "dec", output_embedding=embedding)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    with pytest.raises(DecoderMismatch, match="shape"):
        loaded.attach_output_embedding(torch.randn(41, 32))


def test_load_decoder_attaches_the_embedding_to_a_tied_head_only(tmp_path):
    """Notebooks pass the base model's embedding whatever head notebook 03 trained
    (its HEAD knob), so a store head must load as before, without a copy of it."""
    embedding = torch.randn(40, 32)
    store_head = tiny()
    save_decoder(store_head, tmp_path / "store")
    loaded = load_decoder(tmp_path / "store", output_embedding=embedding)
    assert loaded.output_embedding is None
    x = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x), store_head(x))
    save_decoder(tiny(head="tied"), tmp_path / "tied")
    assert load_decoder(tmp_path / "tied", output_embedding=embedding).output_embedding is not None
    with pytest.raises(RuntimeError, match="attach_output_embedding"):  # forgotten: says what to do
        load_decoder(tmp_path / "tied")(x)


def _flash_calls(decoder, x, pad, backward: bool) -> int:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = decoder(x, pad)
        if backward:
            out.sum().backward()
    return sum(e.count for e in prof.key_averages() if "flash_attention" in e.key)


def test_cpu_training_runs_the_math_attention_kernel_with_the_same_gradients():
    """The library's CPU flash kernel took half of a W = 4 training step; on a CPU the
    library layers run the plain-math kernel instead (helpers.decoder._attention_kernel),
    which must compute the same loss and gradients; generation's written-out layers
    (batches up to SMALL_BATCH) keep the default."""
    x, pad = inputs(B=16, W=3), torch.zeros(16, 3, dtype=torch.bool)
    pad[::4, 0] = True
    decoder = tiny(dropout=0.0).train()  # deterministic
    assert _flash_calls(decoder, x, pad, backward=True) == 0
    decoder.zero_grad()
    out = decoder(x, pad)
    out.square().mean().backward()
    mine = {n: p.grad.clone() for n, p in decoder.named_parameters()}
    decoder.zero_grad()
    # the library's own forward, with its default kernel
    h = decoder.inp(torch.where(pad[..., None], 0.0, x)) + decoder.pos
    mask = decoder._attention_mask(pad, 16, 3, x.device)
    reference = decoder.head(decoder.norm(decoder.encoder(h, mask=mask)[:, -1]))
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    reference.square().mean().backward()
    for name, p in decoder.named_parameters():
        torch.testing.assert_close(mine[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():  # batched inference: math too; generation: the default
        assert _flash_calls(decoder.eval(), inputs(B=SMALL_BATCH + 1, W=3), None, False) == 0
        assert _flash_calls(decoder.eval(), inputs(B=SMALL_BATCH, W=3), None, False) > 0
