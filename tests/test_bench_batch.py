"""benchmarks/bench_batch.py: what its --runs mean (the training itself is a benchmark)."""
import importlib.util
import sys
from pathlib import Path

import pytest

FOLDER = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench_batch():
    sys.path.insert(0, str(FOLDER))  # it imports bench_dropout from its own folder
    try:
        spec = importlib.util.spec_from_file_location("bench_batch", FOLDER / "bench_batch.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(FOLDER))
    return module


def test_a_run_takes_the_sizes_dropout_and_rate_unless_its_suffixes_set_them(bench_batch):
    runs = bench_batch.parse_runs("256x4,128x3,256x6d0.1,256x4s1,256x6d0.1s2,256x12d0.1l1e-3,"
                                  "256x4l0.006s1,256x4b0.3,256x4d0.1l1e-3b1t600s2,256x4b0,"
                                  "256x4t150", dropout=0.05, lr=3e-3)
    assert runs == [(256, 4, 0.05, 3e-3, 0.5, 300, 0), (128, 3, 0.05, 3e-3, 0.5, 300, 0),
                    (256, 6, 0.1, 3e-3, 0.5, 300, 0), (256, 4, 0.05, 3e-3, 0.5, 300, 1),
                    (256, 6, 0.1, 3e-3, 0.5, 300, 2), (256, 12, 0.1, 1e-3, 0.5, 300, 0),
                    (256, 4, 0.05, 6e-3, 0.5, 300, 1), (256, 4, 0.05, 3e-3, 0.3, 300, 0),
                    (256, 4, 0.1, 1e-3, 1.0, 600, 2), (256, 4, 0.05, 3e-3, 0.0, 300, 0),
                    (256, 4, 0.05, 3e-3, 0.5, 150, 0)]
    names = [bench_batch.run_name(*r, dropout=0.05, lr=3e-3) for r in runs]
    # the default runs keep their old names
    assert names == ["256x4", "128x3", "256x6d0.1", "256x4s1", "256x6d0.1s2", "256x12d0.1l0.001",
                     "256x4l0.006s1", "256x4b0.3", "256x4d0.1l0.001b1t600s2", "256x4b0",
                     "256x4t150"]


@pytest.mark.parametrize("text", ["", "256", "256x0", "256x4d1", "256x4d-0.1", "256x4dx",
                                  "256x4d", "256x4s", "256x4s-1", "256x4s1d0.1", "256x4d0.1.2",
                                  "ax4", "256x4,", "256x4l", "256x4l0", "256x4l-1e-3",
                                  "256x4s1l1e-3", "256x4l1e-3d0.1", "256x4b", "256x4b1.5",
                                  "256x4b-0.1", "256x4b0.3l1e-3", "256x4s1b0.3", "256x4t",
                                  "256x4t0", "256x4t-5", "256x4t300b0.3", "256x4s1t300"])
def test_a_malformed_run_is_refused_with_the_syntax(bench_batch, text):
    with pytest.raises(SystemExit, match=r"BATCHxEPOCHS\[dDROPOUT\]\[lLR\]\[bBETA\]\[tTEMPERATURE\]\[sSEED\].*256x6d0.1"):
        bench_batch.parse_runs(text, dropout=0.0, lr=3e-3)


@pytest.mark.parametrize("text", ["256x4,256x4", "256x4,256x4d0", "256x4d0.1,256x4d0.10",
                                  "256x4s1,256x4s01", "256x4,256x4l0.003",
                                  "256x4l1e-3,256x4l0.001", "256x4b0.5,256x4",
                                  "256x4b0.3,256x4b0.30", "256x4t300,256x4"])
def test_the_same_run_asked_twice_is_refused(bench_batch, text):
    """Two runs of one name would overwrite each other's results and the reference."""
    with pytest.raises(SystemExit, match="twice"):
        bench_batch.parse_runs(text, dropout=0.0, lr=3e-3)
