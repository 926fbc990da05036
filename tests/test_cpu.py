"""CPU detection (helpers.cpu): FAISS's bundled OpenBLAS gets a kernel that fits the CPU."""

import os

import pytest

from helpers import cpu

AVX512 = frozenset({"avx2", "fma", "avx512f", "avx512bw"})
AVX2 = frozenset({"avx2", "fma"})


@pytest.mark.parametrize("kernel,flags,expected", [
    ("Prescott", AVX512, "SkylakeX"),   # a Xeon that OpenBLAS 0.3.15 does not recognise
    ("Prescott", AVX2, "Haswell"),
    ("Prescott", frozenset({"sse4_2"}), None),  # nothing better to offer
    ("Barcelona", AVX512, "SkylakeX"),  # an AVX-512 AMD EPYC that 0.3.15 does not recognise
    ("Zen", AVX512, "SkylakeX"),        # an AVX2 kernel on an AVX-512 CPU
    ("Barcelona", AVX2, "Haswell"),
    ("Zen", AVX2, None),                # recognised: left alone
    ("Haswell", AVX2, None),
    ("SkylakeX", AVX512, None),
    ("SapphireRapids", AVX512, None),   # a wider kernel than SkylakeX is kept too
    (None, AVX512, None),               # no OpenBLAS to ask
])
def test_a_kernel_narrower_than_the_cpu_is_replaced(kernel, flags, expected):
    assert cpu.better_coretype(kernel, flags) == expected


@pytest.mark.skipif(cpu._bundled_openblas() is None, reason="this faiss bundles no OpenBLAS")
def test_the_bundled_openblas_is_asked_in_a_subprocess_and_obeys_the_variable():
    forced = cpu.openblas_kernel(env={**os.environ, "OPENBLAS_CORETYPE": "Prescott"})
    assert forced == "Prescott"
    assert cpu.openblas_kernel() not in (None, "")


def test_a_coretype_the_user_set_is_left_alone(monkeypatch):
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    cpu.prepare_openblas.cache_clear()
    try:
        monkeypatch.setattr(cpu, "cpu_flags", lambda: AVX2)
        assert cpu.prepare_openblas() == "OPENBLAS_CORETYPE=Haswell (set by you)"
        cpu.prepare_openblas.cache_clear()
        monkeypatch.setattr(cpu, "cpu_flags", lambda: AVX512)  # kept, with a hint
        said = cpu.prepare_openblas()
        assert said.startswith("OPENBLAS_CORETYPE=Haswell (set by you; ")
        assert "unset it to let the helpers set SkylakeX" in said
        assert os.environ["OPENBLAS_CORETYPE"] == "Haswell"
    finally:
        cpu.prepare_openblas.cache_clear()


def test_fast_bf16_needs_avx512_bf16_or_amx(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: AVX512)
    assert not cpu.fast_bf16()
    monkeypatch.setattr(cpu, "cpu_flags", lambda: AVX512 | {"avx512_bf16"})
    assert cpu.fast_bf16()
    monkeypatch.setattr(cpu, "cpu_flags", lambda: AVX2 | {"amx_bf16"})
    assert cpu.fast_bf16()


def test_the_description_names_what_was_detected():
    line = cpu.describe()
    assert line.startswith("CPU: ") and "bf16" in line and "openblas" in line.lower()


def test_autocast_dtype_is_bf16_only_where_bf16_is_native(monkeypatch):
    import torch

    monkeypatch.setattr(cpu, "cpu_flags", lambda: AVX2)
    assert cpu.autocast_dtype("cpu") is None
    monkeypatch.setattr(cpu, "cpu_flags", lambda: AVX512 | {"avx512_bf16"})
    assert cpu.autocast_dtype(torch.device("cpu")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cpu.autocast_dtype("cuda") is None  # no GPU: nothing to autocast on
    assert cpu.autocast_dtype("meta") is None
