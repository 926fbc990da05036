"""Bad input around devices and data folders: each says what to do, nothing is overwritten."""

import pytest
import torch

from helpers.decoder import DecoderConfig, MemoryDecoder, load_decoder, save_decoder
from helpers.devicecheck import fake_gpu
from helpers.model import ModelLoadError
from helpers.paths import data_dir


def test_a_data_dir_that_does_not_exist_is_refused_not_created(tmp_path, monkeypatch):
    missing = tmp_path / "drive" / "MyDrive" / "memdec"
    monkeypatch.setenv("MEMDEC_DATA_DIR", str(missing))
    with pytest.raises(FileNotFoundError, match="drive.mount"):
        data_dir()
    assert not missing.exists() and not missing.parent.exists()


def _decoder():
    torch.manual_seed(0)
    return MemoryDecoder(DecoderConfig(key_dim=8, base_vocab_size=20, dim=8, n_layers=1,
                                       n_heads=2, vocab_ids=[3, 5, 7], dropout=0.0)).eval()


def test_a_decoder_saved_on_the_gpu_loads_on_the_cpu_and_back(tmp_path):
    x = torch.randn(2, 1, 8)
    with fake_gpu():
        on_gpu = _decoder().to("cuda")
        want = on_gpu(x.to("cuda")).cpu()
        save_decoder(on_gpu, tmp_path / "dec")
        back = load_decoder(tmp_path / "dec", device=on_gpu.inp.weight.device)
        assert back.inp.weight.device.type == "cuda"
    on_cpu = load_decoder(tmp_path / "dec")
    assert on_cpu.inp.weight.device.type == "cpu"
    torch.testing.assert_close(on_cpu(x), want)


def test_a_decoder_asked_onto_cuda_without_a_gpu_says_what_to_use(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    save_decoder(_decoder(), tmp_path / "dec")
    with pytest.raises(ModelLoadError, match="device='auto' or 'cpu'.*Colab"):
        load_decoder(tmp_path / "dec", device="cuda")
    assert (tmp_path / "dec" / "model.safetensors").is_file()  # nothing touched


def test_an_index_saved_anywhere_opens_on_a_cpu_and_use_gpu_true_without_one_says_what_to_do(
        store_index):
    """save_index writes the CPU form (a GPU index is copied back first), so it opens here."""
    from helpers.index import load_index, save_index

    store, index = store_index
    save_index(index, store)
    assert load_index(store, use_gpu="auto").ntotal == len(store)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="use_gpu='auto'"):
        load_index(store, use_gpu=True)


@pytest.mark.parametrize("capability,dtype", [((7, 5), torch.float32),   # T4: emulated bf16
                                              ((8, 0), torch.bfloat16),  # A100 and newer
                                              ((9, 0), torch.bfloat16)])
def test_the_model_loads_in_bf16_only_on_a_gpu_that_computes_in_it(monkeypatch, capability,
                                                                  dtype):
    from helpers.model import default_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    assert default_dtype(torch.device("cuda")) == dtype
    assert default_dtype(torch.device("cpu")) == torch.float32
