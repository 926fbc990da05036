"""The adaptive α gate (helpers.gate), notebook 04 section 6."""

import math

import numpy as np
import pytest
import torch

from helpers.gate import (DEC_FLOOR, FEATURES, AlphaGate, GateConfig, GateMismatch, check_gate,
                          decoder_fingerprint, gate_features, gate_inputs, load_gate,
                          mixture_nll, save_gate, train_gate)
from helpers.sampling import generate
from tests.test_sampling import make_decoder

pytestmark = pytest.mark.usefixtures("one_thread")
F = {name: i for i, name in enumerate(FEATURES)}


@pytest.fixture(scope="module")
def decoder(tiny, store_index):
    return make_decoder(store_index[0], tiny[0].config.vocab_size, window=2)


def test_features_of_known_distributions():
    V = 50
    base = torch.zeros(2, V)                      # uniform
    dec = torch.full((2, V), -30.0)
    dec[0, 7] = 0.0                               # all mass on token 7 (floor elsewhere)
    dec[1] = torch.log_softmax(torch.zeros(V), -1)  # row 1: the same uniform as base
    f = gate_features(base, dec)
    assert f.shape == (2, len(FEATURES))
    assert f[0, F["base_entropy"]] == pytest.approx(math.log(V), rel=1e-5)
    assert f[0, F["base_max_logp"]] == pytest.approx(-math.log(V), rel=1e-5)
    assert f[0, F["dec_entropy"]] == pytest.approx(0.0, abs=1e-5)
    assert f[0, F["dec_max_logp"]] == pytest.approx(0.0, abs=1e-5)
    assert f[0, F["base_logp_of_dec_top"]] == pytest.approx(-math.log(V), rel=1e-5)
    assert f[0, F["overlap"]] == pytest.approx(1 / V, rel=1e-4)
    assert f[1, F["overlap"]] == pytest.approx(1.0, rel=1e-5)
    assert f[1, F["dec_logp_of_base_top"]] == pytest.approx(-math.log(V), rel=1e-5)


def test_unknown_features_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="dec_entropy"):
        gate_features(torch.zeros(1, 4), torch.zeros(1, 4), names=["distance"])
    with pytest.raises(ValueError, match="subset"):
        GateConfig(features=["nope"])


def two_domains(n=400, seed=0):
    """In domain the memory is right and sure; off domain it is sure and wrong."""
    rng = np.random.default_rng(seed)

    def domain(dec_entropy, p_dec):
        feats = rng.normal(size=(n, len(FEATURES))).astype(np.float32)
        feats[:, F["dec_entropy"]] = dec_entropy + 0.3 * rng.normal(size=n)
        return {"features": feats,
                "p_base": rng.uniform(0.05, 0.3, n).astype(np.float32),
                "p_dec": np.full(n, p_dec, np.float32)}

    return domain(1.0, 0.8), domain(3.0, 1e-4)


def ppl(alpha, d):
    nll = mixture_nll(torch.as_tensor(alpha), torch.as_tensor(d["p_base"]),
                      torch.as_tensor(d["p_dec"]))
    return float(nll.mean().exp())


def test_the_gate_learns_to_open_in_domain_and_close_off_domain():
    inside, outside = two_domains()
    gate, history = train_gate([inside, outside], steps=300)
    assert history["loss"][-1] < history["loss"][0]
    a_in = gate(torch.as_tensor(inside["features"]))
    a_out = gate(torch.as_tensor(outside["features"]))
    assert a_in.mean() > 0.8 and a_out.mean() < 0.1
    best_fixed = min(np.linspace(0, 1, 21), key=lambda a: ppl(a, inside) + ppl(a, outside))
    assert ppl(a_out.detach(), outside) < 1.05 * ppl(0.0, outside)
    assert ppl(a_in.detach(), inside) < ppl(best_fixed, inside)


def test_training_is_seeded():
    inside, outside = two_domains()
    a, _ = train_gate([inside, outside], steps=20, seed=3)
    b, _ = train_gate([inside, outside], steps=20, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values()))


def test_bad_training_data_is_refused():
    inside, _ = two_domains(n=10)
    with pytest.raises(ValueError, match="at least one domain"):
        train_gate([])
    inside["features"][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        train_gate([inside])


def test_gate_inputs_agree_with_the_base_model_and_the_decoder(tiny, decoder, store_index):
    from helpers.knn import base_target_probs
    from helpers.train_decoder import decoder_target_probs

    model, tok = tiny
    ex, p_base = base_target_probs(model, tok, ["the data subject shall have the right",
                                                "personal data concerning him"])
    got = gate_inputs(model, decoder, ex.keys, ex.doc, ex.values, chunk=3)
    np.testing.assert_allclose(got["p_base"], p_base, rtol=1e-4)
    np.testing.assert_allclose(got["p_dec"], decoder_target_probs(
        decoder, ex.keys, ex.doc, ex.values), rtol=1e-4, atol=1e-12)
    assert got["features"].shape == (len(ex.values), len(FEATURES))


def trained_gate(decoder, **kw):
    gate, _ = train_gate(list(two_domains(n=50)), steps=5, decoder=decoder, **kw)
    return gate


def test_a_saved_gate_loads_in_a_fresh_object_and_gives_the_same_alphas(tmp_path, decoder,
                                                                      tiny):
    gate = trained_gate(decoder, base_model_name="tiny-gemma", tokenizer=tiny[1])
    save_gate(gate, tmp_path / "gate")
    again = load_gate(tmp_path / "gate", decoder=decoder, base_model_name="tiny-gemma",
                      tokenizer=tiny[1])
    x = torch.randn(5, len(FEATURES))
    torch.testing.assert_close(again(x), gate(x))


def test_a_gate_for_another_decoder_or_model_is_refused(tmp_path, decoder, tiny,
                                                        store_index):
    gate = trained_gate(decoder, base_model_name="tiny-gemma")
    save_gate(gate, tmp_path / "gate")
    other = make_decoder(store_index[0], tiny[0].config.vocab_size, window=2, seed=1)
    assert decoder_fingerprint(other) != decoder_fingerprint(decoder)
    with pytest.raises(GateMismatch, match="decoder.*notebooks/04"):
        load_gate(tmp_path / "gate", decoder=other)
    with pytest.raises(GateMismatch, match="base model"):
        check_gate(gate, base_model_name="google/gemma-2b")
    with pytest.raises(FileNotFoundError, match="Train one"):
        load_gate(tmp_path / "missing")


def test_adaptive_generation_weighs_each_token_by_the_gate(tiny, decoder):
    model, tok = tiny
    gate = trained_gate(decoder)
    kw = dict(mode="memdec", decoder=decoder, temperature=0, top_k=10, max_new_tokens=6)
    steps = list(generate(model, tok, "the data subject", alpha=0.7, gate=gate,
                          adaptive=True, **kw))
    # recompute alpha_t from the same prefix: 0.7 * gate(features of that step)
    ids = tok("the data subject")["input_ids"]
    for step in steps:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            dec = decoder.log_probs_full(out.hidden_states[-1][:, -2:])  # W = 2
            want = 0.7 * gate(gate_features(out.logits[:, -1], dec))
        assert step.alpha == pytest.approx(float(want), abs=1e-4)
        ids = ids + [step.token_id]
    assert len({round(s.alpha, 6) for s in steps}) > 1  # it changes token by token
    off = list(generate(model, tok, "the data subject", alpha=0.0, gate=gate,
                        adaptive=True, **kw))
    base = list(generate(model, tok, "the data subject", mode="base", temperature=0,
                         top_k=10, max_new_tokens=6))
    assert [s.token_id for s in off] == [s.token_id for s in base]  # scale 0: base only


def test_adaptive_mode_without_a_gate_or_with_the_wrong_one_says_what_to_do(
        tiny, decoder, store_index):
    model, tok = tiny
    kw = dict(mode="memdec", decoder=decoder, top_k=10, adaptive=True)
    with pytest.raises(ValueError, match="no α gate is trained yet.*notebooks/04"):
        generate(model, tok, "the data", **kw)
    other = make_decoder(store_index[0], model.config.vocab_size, window=2, seed=1)
    with pytest.raises(GateMismatch):
        generate(model, tok, "the data", gate=trained_gate(other), **kw)
    with pytest.raises(ValueError, match="mode='memdec'"):
        generate(model, tok, "the data", mode="knn", store=store_index[0],
                 index=store_index[1], top_k=10, adaptive=True, gate=trained_gate(decoder))


def test_a_gate_is_a_small_network():
    gate = AlphaGate(GateConfig())
    assert sum(p.numel() for p in gate.parameters()) < 200
    out = gate(torch.randn(7, len(FEATURES)))
    assert out.shape == (7,) and ((out > 0) & (out < 1)).all()


def test_the_sparse_form_over_a_head_vocabulary_gives_the_same_features():
    torch.manual_seed(0)
    V, vocab = 40, torch.tensor([2, 5, 11, 17, 30, 31])
    base = torch.randn(6, V) * 3
    base[0, 11] = 20.0  # row 0: the base model's top token is in the decoder's vocabulary
    head = torch.log_softmax(torch.randn(6, len(vocab)) * 2, -1)   # (N, V_s)
    full = torch.full((6, V), -30.0)
    full[:, vocab] = head
    torch.testing.assert_close(gate_features(base, head, vocab=vocab),
                               gate_features(base, full), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("sparse", [False, True])
def test_features_equal_the_textbook_formulas_on_a_wide_vocabulary(sparse):
    """gate_features reads the base logits as few times as it can; the figures must
    be those of the plain formulas (log_softmax, entropy, overlap), peaked rows too."""
    torch.manual_seed(1)
    V, n = 5000, 5
    base = torch.randn(n, V) * 4
    base[0, 3] = 60.0                                 # nearly one-hot: entropy close to 0
    vocab = torch.sort(torch.randperm(V)[:300]).values
    head = torch.log_softmax(torch.randn(n, len(vocab)) * 3, -1)
    full = torch.full((n, V), DEC_FLOOR)
    full[:, vocab] = head
    got = gate_features(base, head, vocab=vocab) if sparse else gate_features(base, full)
    lb, ld = torch.log_softmax(base, -1), torch.log_softmax(full, -1)
    pb, pd = lb.exp(), ld.exp()
    want = {"base_entropy": -(pb * lb).sum(-1), "base_max_logp": lb.max(-1).values,
            "dec_entropy": -(pd * ld).sum(-1), "dec_max_logp": ld.max(-1).values,
            "dec_logp_of_base_top": ld.gather(1, lb.argmax(-1, keepdim=True))[:, 0],
            "base_logp_of_dec_top": lb.gather(1, ld.argmax(-1, keepdim=True))[:, 0],
            "overlap": torch.minimum(pb, pd).sum(-1)}
    for name, value in want.items():
        torch.testing.assert_close(got[:, F[name]], value, atol=2e-4, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_gate_alpha_reads_only_the_gates_own_columns():
    from helpers.gate import gate_alpha
    inside, outside = two_domains()
    gate, _ = train_gate([inside, outside], features=["dec_entropy", "dec_max_logp"], steps=50)
    cols = [F["dec_entropy"], F["dec_max_logp"]]
    expected = gate(torch.as_tensor(inside["features"][:, cols])).detach().numpy()
    np.testing.assert_allclose(gate_alpha(gate, inside), expected, rtol=1e-6)


def test_gate_loss_is_train_gates_objective_and_ranks_a_useless_gate_last():
    from helpers.gate import gate_loss
    inside, outside = two_domains()
    gate, history = train_gate([inside, outside], steps=300)
    # after the last step the loss is that of the weights before it, so compare one step back
    assert gate_loss(gate, [inside, outside]) == pytest.approx(history["loss"][-1], rel=1e-2)
    useless, _ = train_gate([inside, outside], steps=1, lr=1e-6)  # barely trained
    fresh_in, fresh_out = two_domains(seed=1)                     # other rows, same kind
    assert gate_loss(gate, [fresh_in, fresh_out]) < gate_loss(useless, [fresh_in, fresh_out])
