"""Saves that cannot destroy (helpers.paths.atomic_dir and everything that saves with it)."""

import errno
import os

import pytest
import torch

from helpers.decoder import DecoderConfig, MemoryDecoder, load_decoder, save_decoder
from helpers.paths import SaveError, atomic_dir, atomic_file
from helpers.reuse import finish_run, finished_run

SETTINGS = {"epochs": 3}


def small_decoder(seed=0):
    torch.manual_seed(seed)
    cfg = DecoderConfig(key_dim=8, base_vocab_size=50, vocab_ids=list(range(10)), dim=16,
                        n_layers=1, n_heads=2)
    return MemoryDecoder(cfg).eval()


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                   b.state_dict().values()))


def test_saving_into_a_folder_with_other_files_is_refused_and_deletes_nothing(tmp_path):
    (tmp_path / "notes.txt").write_text("my notes")
    with pytest.raises(FileExistsError, match=r"notes\.txt.*Move those files elsewhere"):
        save_decoder(small_decoder(), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_gate_saved_into_a_decoder_folder_with_a_user_file_is_refused(tmp_path):
    from helpers.gate import AlphaGate, GateConfig, save_gate
    folder = tmp_path / "ckpt"
    save_decoder(small_decoder(), folder)
    (folder / "metrics.csv").write_text("epoch,loss\n")
    with pytest.raises(FileExistsError, match=str(folder)):
        save_gate(AlphaGate(GateConfig()), folder)
    assert load_decoder(folder) is not None and (folder / "metrics.csv").exists()


def test_a_new_checkpoint_replaces_the_old_one_whole(tmp_path):
    folder = tmp_path / "d"
    save_decoder(small_decoder(0), folder)
    save_decoder(new := small_decoder(1), folder)
    assert same_weights(load_decoder(folder), new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no leftovers


def test_an_error_while_swapping_in_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    folder = tmp_path / "d"
    save_decoder(old := small_decoder(0), folder)
    real = os.replace

    def fail_second(src, dst):  # the old copy moved aside, the new one fails to move in
        if ".new" in str(src):
            raise OSError(errno.EIO, "I/O error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_second)
    with pytest.raises(SaveError, match=f"could not save {folder}.*unchanged"):
        save_decoder(small_decoder(1), folder)
    monkeypatch.undo()
    assert same_weights(load_decoder(folder), old)


def test_a_swap_interrupted_between_its_renames_is_repaired_on_the_next_save(tmp_path):
    folder = tmp_path / "d"
    save_decoder(old := small_decoder(0), folder)
    os.replace(folder, tmp_path / ".d.old")  # killed right after moving the old copy aside
    with pytest.raises(RuntimeError):
        with atomic_dir(folder, ("*.safetensors", "*.json")):
            raise RuntimeError("interrupted again")
    assert same_weights(load_decoder(folder), old)


def test_disk_full_during_a_save_keeps_the_previous_state_and_names_the_folder(tmp_path):
    folder = tmp_path / "d"
    save_decoder(old := small_decoder(0), folder)
    with pytest.raises(SaveError, match=f"could not save {folder} \\(the disk is full"):
        with atomic_dir(folder, ("*.safetensors", "*.json")) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert same_weights(load_decoder(folder), old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_a_read_only_data_folder_gives_an_error_that_names_it(tmp_path, monkeypatch):
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(SaveError, match=f"{tmp_path}.*read-only.*MEMDEC_DATA_DIR"):
        save_decoder(small_decoder(), tmp_path / "d")
    with pytest.raises(SaveError, match="read-only"):
        with atomic_file(tmp_path / "metrics.json"):
            pass


def test_retraining_keeps_the_finished_run_until_the_new_one_is_complete(tmp_path,
                                                                         monkeypatch):
    import helpers.paths as paths
    folder = tmp_path / "memory_decoder"
    finish_run(old := small_decoder(0), folder, SETTINGS, history={"loss": [1.0]})
    monkeypatch.setattr(paths, "_swap_in", lambda tmp, target: (_ for _ in ()).throw(
        KeyboardInterrupt()))  # Ctrl-C just before the new run goes in
    with pytest.raises(KeyboardInterrupt):
        finish_run(small_decoder(1), folder, SETTINGS, history={"loss": [0.5]})
    monkeypatch.undo()
    assert finished_run(folder, SETTINGS)["history"] == {"loss": [1.0]}
    assert same_weights(load_decoder(folder), old)


def test_finish_run_leaves_a_partial_folder_with_user_files_alone(tmp_path):
    folder = tmp_path / "memory_decoder"
    (tmp_path / "memory_decoder.partial").mkdir()
    (tmp_path / "memory_decoder.partial" / "notes.txt").write_text("keep")
    finish_run(small_decoder(), folder, SETTINGS)
    assert (tmp_path / "memory_decoder.partial" / "notes.txt").read_text() == "keep"


def test_rebuilding_a_store_keeps_files_that_are_not_the_stores(tiny, tmp_path):
    from helpers.datastore import build_datastore
    model, tok = tiny
    path = tmp_path / "store"
    build_datastore(model, tok, ["the data subject shall"], path, model_name="m",
                    corpus_name="c")
    (path / "my_analysis.ipynb").write_text("{}")
    with pytest.raises(FileExistsError, match="my_analysis.ipynb"):
        build_datastore(model, tok, ["the right to obtain"], path, model_name="m",
                        corpus_name="c")
    assert (path / "my_analysis.ipynb").exists() and (path / "keys.npy").exists()
