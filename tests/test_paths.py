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
        with atomic_dir(target, owned=("old", "new")) as tmp:
            (tmp / version).write_text(version)
    assert [p.name for p in target.iterdir()] == ["new"]


def test_each_size_keeps_its_metrics_apart(data_dir):
    update_metrics({"base_ppl": 9.2})
    update_metrics({"base_ppl": 30.0}, tag="smoke")
    update_metrics({"base_ppl": 9.9}, tag="quick")
    read = lambda *p: json.loads((data_dir.joinpath("artifacts", *p, "metrics.json")).read_text())
    assert read() == {"base_ppl": 9.2}
    assert read("quick") == {"base_ppl": 9.9}
    assert read("smoke") == {"base_ppl": 30.0}


def test_an_unknown_size_tag_is_refused(data_dir):
    from helpers.paths import artifacts_dir
    with pytest.raises(ValueError, match="'', 'quick' or 'smoke'"):
        artifacts_dir(True)


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


def test_benchmark_results_prefer_a_finished_local_run(data_dir, tmp_path, monkeypatch):
    from helpers import paths

    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path)
    assert paths.benchmark_results("bench_y") is None
    shipped = tmp_path / "benchmarks" / "results" / "bench_y.json"
    shipped.parent.mkdir(parents=True)
    shipped.write_text(json.dumps({"ppl": 5.0}))
    res, source = paths.benchmark_results("bench_y")
    assert res == {"ppl": 5.0} and "shipped" in source
    paths.write_results("bench_y", {"ppl": 4.0, "partial": True})  # interrupted run
    assert paths.benchmark_results("bench_y")[0] == {"ppl": 5.0}
    paths.write_results("bench_y", {"ppl": 4.0})
    res, source = paths.benchmark_results("bench_y")
    assert res["ppl"] == 4.0 and "your run" in source


def test_shipped_finetune_reference_is_a_finished_full_size_run():
    from helpers.paths import REPO_ROOT

    res = json.loads((REPO_ROOT / "benchmarks/results/bench_finetune.json").read_text())
    assert not res.get("partial") and res["test_tokens"] > 10_000
    assert res["finetune_ppl"] < res["base_ppl"] and res["machine"]["cpu"]
