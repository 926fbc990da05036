"""scripts/gpu_check.py on the CPU: the notebooks on the pretend GPU (helpers.devicecheck).

On a machine with a CUDA GPU the same script runs them on the GPU itself
(``python scripts/gpu_check.py``); here it keeps working without one.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.pretend_gpu  # -m "not pretend_gpu" skips these two


def _gpu_check(tmp_path, *args):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--fake-gpu",
                          "--skip-helpers", "--keep", str(tmp_path), *args],
                         capture_output=True, text=True, timeout=1800)
    report = "\n".join(ln for ln in out.stdout.splitlines() if ln.startswith(("gpu_check", "  ")))
    return out.returncode, report + "\n" + out.stderr[-2000:] * (out.returncode != 0)


def test_notebooks_01_and_02_keep_to_the_models_device(tmp_path):
    code, report = _gpu_check(tmp_path, "--only", "01", "02")
    assert code == 0, report
    assert report.count("model on cuda:0") == 2, report


def test_notebooks_04_05_and_06_build_what_they_lack_in_an_empty_folder(tmp_path):
    """Each alone in an empty data folder, as from a Colab badge: each runs notebook 03 first
    (itself alone in that empty folder), and every decoder ends up on the model's device."""
    code, report = _gpu_check(tmp_path, "--fresh", "--only", "04", "05", "06")
    assert code == 0, report
    lines = {n: next(ln for ln in report.splitlines() if ln.strip().startswith(n))
             for n in ("04", "05", "06")}
    assert "decoder on cuda:0" in lines["04"] and "decoder on cuda:0" in lines["05"], report
    assert "hidden_decoder on cuda:0" in lines["06"], report
    assert "token_decoder on cuda:0" in lines["06"], report
    assert "token_gate on cuda:0" in lines["06"], report   # section 7's gate, beside the model
    for n in ("04", "05", "06"):
        assert (tmp_path / "data" / n / "artifacts" / "smoke" / "memory_decoder"
                / "config.json").is_file()
    assert (tmp_path / "data" / "06" / "artifacts" / "smoke" / "token_decoder"
            / "run.json").is_file()
    assert (tmp_path / "data" / "06" / "artifacts" / "smoke" / "token_alpha_gate"
            / "run.json").is_file()


def test_the_helpers_run_on_the_pretend_gpu_keep_self_targets_included(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--fake-gpu",
                          "--only", "none", "--keep", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    helpers = next((ln for ln in out.stdout.splitlines() if ln.strip().startswith("helpers")), "")
    assert out.returncode == 0 and " ok " in helpers, out.stdout[-2000:] + out.stderr[-2000:]
    assert "decoder: cuda:0" in helpers and "keep_self targets:" in helpers, helpers
