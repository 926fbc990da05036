"""Data folders and the shared metrics file (helpers.paths)."""

import json

import pytest
import torch

from helpers.paths import atomic_dir, update_metrics


def test_metrics_are_merged_not_overwritten(data_dir):
    update_metrics({"base_ppl": 14.1})
    merged = update_metrics({"knn_ppl": 9.8})
    assert merged == {"base_ppl": 14.1, "knn_ppl": 9.8}
    assert json.loads((data_dir / "artifacts" / "metrics.json").read_text()) == merged


def test_atomic_dir_leaves_nothing_when_the_body_fails(tmp_path):
    target = tmp_path / "store"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half.npy").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_an_old_version_whole(tmp_path):
    target = tmp_path / "store"
    for version in ("old", "new"):
        with atomic_dir(target) as tmp:
            (tmp / version).write_text(version)
    assert [p.name for p in target.iterdir()] == ["new"]


def test_smoke_runs_keep_their_metrics_apart_from_full_runs(data_dir):
    update_metrics({"base_ppl": 9.2})
    update_metrics({"base_ppl": 30.0}, smoke=True)
    full = json.loads((data_dir / "artifacts" / "metrics.json").read_text())
    assert full == {"base_ppl": 9.2}


def test_benchmark_results_are_saved_as_json_and_printed(data_dir, capsys):
    from helpers.paths import write_results

    out = write_results("bench_x", {"tokens_per_second": 639.2, "threads": 2})
    saved = json.loads(out.read_text())
    machine = saved.pop("machine")
    assert saved == {"tokens_per_second": 639.2, "threads": 2}
    assert {"cpu", "cpu_capability", "threads", "gpu", "torch", "date"} <= set(machine)
    assert machine["torch"] == torch.__version__
    printed = capsys.readouterr().out
    assert "tokens_per_second   639.2\nthreads             2\n" in printed
