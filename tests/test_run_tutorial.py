"""scripts/run_tutorial.py: what `make tutorial` calls (sizes, progress, peak memory)."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import run_tutorial  # noqa: E402


@pytest.mark.parametrize("text,full", [("1", True), ("True", True), ("yes", True),
                                       ("0", False), ("False", False), ("", False)])
def test_make_tutorial_full_flag_reads_as_a_boolean(text, full):
    assert run_tutorial.parse_params([f"FULL={text}"]) == {"FULL": full}


def test_a_full_value_that_is_not_a_boolean_stops_with_what_to_type():
    with pytest.raises(SystemExit, match="use FULL=True or FULL=False"):
        run_tutorial.parse_params(["FULL=2"])


def test_other_parameters_are_python_literals_or_strings():
    assert run_tutorial.parse_params(["W=1", "DECODER_LR=3e-3", "MODEL_NAME=google/gemma-2b"]) \
        == {"W": 1, "DECODER_LR": 3e-3, "MODEL_NAME": "google/gemma-2b"}


def test_a_parameter_without_a_value_is_refused():
    with pytest.raises(SystemExit, match="expected NAME=VALUE"):
        run_tutorial.parse_params(["W"])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_peak_memory_of_a_child_process_is_seen_while_it_runs():
    code = "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(3)"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        peak = 0
        for _ in range(40):
            time.sleep(0.1)
            peak = max(peak, run_tutorial.memory_of_children()[0])
            if peak > 200 * 2**20:
                break
        assert peak > 200 * 2**20
    finally:
        child.kill()
        child.wait()


def test_each_code_cell_is_announced_and_a_long_one_gets_a_heartbeat(capsys):
    from types import SimpleNamespace
    cell = SimpleNamespace(cell_type="code", source="# comment\nx = train(model)\n")
    with run_tutorial.Progress("03", 5, every=0.5) as progress:
        progress.on_cell_start(cell, 2)
        time.sleep(1.6)
        progress.on_cell_executed(cell, 2)
        progress.on_cell_start(SimpleNamespace(cell_type="markdown", source="# Title"), 3)
    out = capsys.readouterr().out
    assert "[03 cell 2/4" in out and "x = train(model)" in out
    assert "cell 2 still running" in out
    assert "cell 3" not in out  # markdown cells are not announced


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_the_peak_is_put_on_the_cell_that_ran_and_its_mapped_files_are_told_apart(tmp_path):
    from types import SimpleNamespace
    mapped = tmp_path / "keys.bin"
    mapped.write_bytes(b"\1" * (96 * 2**20))
    code = ("import mmap, sys, time\n"
            "f = open(sys.argv[1], 'rb'); m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)\n"
            "s = sum(m[i] for i in range(0, len(m), 4096))  # every page read: resident, file-backed\n"
            "b = bytearray(160 * 2**20); b[::4096] = b'x' * len(b[::4096])\n"
            "time.sleep(30)")
    cell = SimpleNamespace(cell_type="code", source="keys = open_store()\n")
    with run_tutorial.Progress("02", 9, every=60) as progress:
        progress.on_cell_start(SimpleNamespace(cell_type="code", source="import numpy"), 1)
        progress.on_cell_executed(SimpleNamespace(cell_type="code", source="import numpy"), 1)
        progress.on_cell_start(cell, 4)
        child = subprocess.Popen([sys.executable, "-c", code, str(mapped)])
        try:
            for _ in range(100):
                time.sleep(0.1)
                if run_tutorial.memory_of_children()[0] > 250 * 2**20:
                    break
            time.sleep(1.2)  # the watcher samples once a second
            progress.on_cell_executed(cell, 4)
            progress.on_cell_start(SimpleNamespace(cell_type="code", source="print(1)"), 5)
            progress.on_cell_executed(SimpleNamespace(cell_type="code", source="print(1)"), 5)
        finally:
            child.kill()
            child.wait()
    assert progress.peak > 250 * 2**20
    assert progress.peak_cell == 4  # not the cell before it, nor the one after
    assert 90 * 2**20 < progress.peak_file < progress.peak - 150 * 2**20
