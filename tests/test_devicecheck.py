"""The pretend GPU (helpers.devicecheck) and the helpers' device paths run on it.

No GPU is needed: inside ``fake_gpu()`` a model moved to "cuda" marks its
tensors, and every line that a real GPU would refuse raises DeviceMixError.
The first tests show that each known mistake is caught; the rest run the
helpers' device paths (extraction, decoder training, held-out scoring, the
gate's inputs, generation in every mode) on the pretend GPU.
"""

import numpy as np
import pytest
import torch

from helpers.devicecheck import DeviceMixError, fake_gpu
from tests.conftest import STORE_TEXTS, make_model, make_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def gpu_model():
    """(model on the pretend cuda:0, tokenizer), inside fake_gpu()."""
    tok = make_tokenizer()
    tok.padding_side = "right"
    model = make_model(len(tok))
    with fake_gpu():
        yield model.to("cuda"), tok


def test_a_model_moved_to_cuda_reports_cuda_and_torch_sees_a_gpu(gpu_model):
    model, _ = gpu_model
    assert torch.cuda.is_available() and model.device == torch.device("cuda", 0)
    assert torch.zeros(2).device.type == "cpu"


def test_an_optimizer_step_works_where_torch_is_a_cuda_build_without_a_gpu(monkeypatch):
    """A CUDA build of PyTorch on a GPU-less machine (pip's default on some Pythons) says
    "cuda" to torch.accelerator; AdamW then asks it for the current stream, which fails in C.
    Simulated here by making torch.accelerator answer as such a build does."""
    answers = {"current_accelerator": lambda *a, **k: torch.device("cuda"),
               "is_available": lambda: True}
    for k, v in answers.items():
        monkeypatch.setattr(torch.accelerator, k, v)
    layer = torch.nn.Linear(3, 2)
    with fake_gpu():
        layer = layer.to("cuda")
        opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
        layer(torch.ones(1, 3).to("cuda")).sum().backward()
        opt.step()
        assert torch.accelerator.current_accelerator(check_available=True) is None
    assert torch.accelerator.current_accelerator() == torch.device("cuda")  # given back


def test_cpu_inputs_to_a_model_on_the_gpu_are_refused(gpu_model):
    model, tok = gpu_model
    enc = tok("the data subject", return_tensors="pt")
    with pytest.raises(DeviceMixError, match="same device"):
        model(**enc)
    assert model(**enc.to(model.device)).logits.device.type == "cuda"


def test_numpy_of_a_gpu_tensor_is_refused_and_cpu_first_works(gpu_model):
    model, tok = gpu_model
    logits = model(**tok("the data", return_tensors="pt").to(model.device)).logits
    with pytest.raises(DeviceMixError, match="cpu"):
        logits.numpy()
    with pytest.raises(DeviceMixError):
        np.asarray(logits)
    assert logits.cpu().numpy().shape == logits.shape


def test_gather_with_a_cpu_index_is_refused_but_plain_indexing_is_not(gpu_model):
    model, tok = gpu_model
    logits = model(**tok("the data", return_tensors="pt").to(model.device)).logits[0]
    with pytest.raises(DeviceMixError, match="gather"):
        logits.gather(1, torch.zeros(len(logits), 1, dtype=torch.long))
    assert logits[torch.tensor([0])].device.type == "cuda"  # CUDA accepts CPU indices here
    with pytest.raises(DeviceMixError, match="index"):
        torch.arange(5)[logits.argmax(-1)]


def test_a_module_left_on_the_cpu_is_refused(gpu_model):
    model, tok = gpu_model
    h = model(**tok("the data", return_tensors="pt").to(model.device),
              output_hidden_states=True).hidden_states[-1]
    head = torch.nn.Linear(h.shape[-1], 3)
    with pytest.raises(DeviceMixError, match="linear"):
        head(h)
    assert head.to(model.device)(h).device.type == "cuda"


def test_a_cpu_generator_for_gpu_probabilities_is_refused(gpu_model):
    model, _ = gpu_model
    probs = torch.ones(5, device=model.device) / 5
    with pytest.raises(DeviceMixError, match="generator"):
        torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator(device=model.device).manual_seed(0)
    assert torch.multinomial(probs, 1, generator=gen).device.type == "cuda"


def test_everything_is_back_to_normal_afterwards():
    with fake_gpu():
        pass
    assert not torch.cuda.is_available() and torch.Generator().device.type == "cpu"


def _decoder(store, vocab_size, window=2):
    from helpers.decoder import DecoderConfig, MemoryDecoder
    torch.manual_seed(0)
    return MemoryDecoder(DecoderConfig.from_store(store, vocab_size, dim=16, n_layers=1,
                                                  n_heads=2, window=window, dropout=0.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extraction_scoring_and_training_run_on_the_pretend_gpu(gpu_model, tmp_path, dtype):
    """bfloat16 is what load_base_model picks on a GPU."""
    from helpers.datastore import build_datastore
    from helpers.evaluation import blend_curves, heldout_eval
    from helpers.gate import gate_inputs
    from helpers.index import build_index
    from helpers.train_decoder import (decoder_target_probs, precompute_knn_targets,
                                       train_decoder)

    model, tok = gpu_model
    model.to(dtype)
    store = build_datastore(model, tok, STORE_TEXTS, tmp_path / "store", model_name="tiny",
                            corpus_name="words", progress=False)
    index = build_index(store, use_gpu=False)
    targets = precompute_knn_targets(store, index, k=4, temperature=10.0)
    decoder = _decoder(store, model.config.vocab_size).to(model.device)
    history = train_decoder(decoder, store, targets, epochs=1, batch_size=32, progress=False)
    assert history["loss"] and np.isfinite(history["loss"]).all()
    decoder.eval()
    ev = heldout_eval(model, tok, STORE_TEXTS[:2], "tiny", progress=False)
    p_dec = decoder_target_probs(decoder, ev.keys, ev.doc, ev.values)
    assert p_dec.shape == ev.p_base.shape and np.isfinite(p_dec).all()
    curves = blend_curves(model, decoder, ev, ev.valid, [0.0, 0.5], progress=False)
    assert np.isfinite(curves["logits"]).all()
    got = gate_inputs(model, decoder, ev.keys, ev.doc, ev.values, progress=False)
    assert np.isfinite(got["features"]).all()


@pytest.mark.parametrize("mode", ["base", "memdec", "knn", "adaptive"])
def test_generation_runs_on_the_pretend_gpu(gpu_model, store_index, mode):
    from helpers.gate import train_gate
    from helpers.sampling import generate_text

    model, tok = gpu_model
    store, index = store_index
    decoder = _decoder(store, model.config.vocab_size).eval().to(model.device)
    kw = {"memdec": {"decoder": decoder}, "knn": {"store": store, "index": index},
          "adaptive": {"decoder": decoder, "adaptive": True}}.get(mode, {})
    if mode == "adaptive":
        rng = np.random.default_rng(0)
        domain = {"features": rng.standard_normal((20, 7)).astype(np.float32),
                  "p_base": rng.random(20).astype(np.float32),
                  "p_dec": rng.random(20).astype(np.float32)}
        kw["gate"] = train_gate([domain], steps=2, decoder=decoder)[0].to(model.device)
    text, steps = generate_text(model, tok, "the data subject",
                                mode="memdec" if mode == "adaptive" else mode, alpha=0.5,
                                temperature=0.7, top_k=5, max_new_tokens=3, seed=0, **kw)
    assert len(steps) == 3


def test_a_model_loaded_inside_computes_like_one_loaded_outside(tmp_path):
    """from_pretrained runs unchecked (transformers' own loading), then model.to marks it."""
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    make_model(len(tok)).save_pretrained(tmp_path)
    ids = tok("the data subject shall", return_tensors="pt")["input_ids"]
    ref = AutoModelForCausalLM.from_pretrained(tmp_path)(input_ids=ids).logits
    with fake_gpu():
        model = AutoModelForCausalLM.from_pretrained(tmp_path).to("cuda")
        got = model(input_ids=ids.to(model.device)).logits.cpu()
    torch.testing.assert_close(got, ref)
