"""Nothing trained twice (helpers.reuse): finished runs are reloaded only when they match."""

import json

import pytest
import torch

from helpers.decoder import DecoderConfig, MemoryDecoder, load_decoder
from helpers.reuse import finish_run, finished_run, partial_dir, save_run

SETTINGS = {"W": 4, "epochs": 3, "lr": 1e-3, "store": "abc123"}


@pytest.fixture()
def decoder():
    torch.manual_seed(0)
    cfg = DecoderConfig(key_dim=8, base_vocab_size=50, vocab_ids=list(range(10)), dim=16,
                        n_layers=1, n_heads=2, window=2)
    return MemoryDecoder(cfg).eval()


def test_a_finished_run_is_found_again_with_its_history(tmp_path, decoder, capsys):
    folder = tmp_path / "memory_decoder"
    finish_run(decoder, folder, SETTINGS, history={"loss": [2.0, 1.5]}, train_seconds=3.2)
    run = finished_run(folder, dict(SETTINGS))
    assert run["history"]["loss"] == [2.0, 1.5] and run["train_seconds"] == 3.2
    again = load_decoder(folder)
    x = torch.randn(3, 2, 8)
    assert torch.equal(again(x), decoder(x))


def test_a_changed_setting_is_named_and_the_run_is_not_reused(tmp_path, decoder, capsys):
    folder = tmp_path / "memory_decoder"
    finish_run(decoder, folder, SETTINGS)
    assert finished_run(folder, {**SETTINGS, "epochs": 12}) is None
    out = capsys.readouterr().out
    assert "epochs = 3 there, 12 here" in out and "training again" in out


def test_a_setting_recorded_but_not_asked_for_any_more_is_a_difference(tmp_path, decoder,
                                                                       capsys):
    folder = tmp_path / "d"
    finish_run(decoder, folder, SETTINGS)
    assert finished_run(folder, {k: v for k, v in SETTINGS.items() if k != "lr"}) is None
    assert "lr = 0.001 there, not set here" in capsys.readouterr().out


def test_a_checkpoint_without_run_json_is_an_unfinished_run(tmp_path, decoder, capsys):
    from helpers.decoder import save_decoder
    folder = tmp_path / "memory_decoder"
    save_decoder(decoder, folder)  # what an interrupted training leaves
    assert finished_run(folder, SETTINGS) is None
    assert "did not finish" in capsys.readouterr().out


def test_an_unreadable_run_json_means_training_again(tmp_path, decoder, capsys):
    folder = tmp_path / "d"
    finish_run(decoder, folder, SETTINGS)
    (folder / "run.json").write_text('{"settings": {"W"')  # truncated
    assert finished_run(folder, SETTINGS) is None
    assert "unreadable" in capsys.readouterr().out


def test_no_checkpoint_at_all_says_so(tmp_path, capsys):
    assert finished_run(tmp_path / "nothing", SETTINGS) is None
    assert "No saved checkpoint" in capsys.readouterr().out


def test_finishing_removes_the_partial_checkpoint_of_the_same_run(tmp_path, decoder):
    from helpers.decoder import save_decoder
    folder = tmp_path / "memory_decoder"
    save_decoder(decoder, partial_dir(folder))
    assert partial_dir(folder).name == "memory_decoder.partial"
    finish_run(decoder, folder, SETTINGS)
    assert not partial_dir(folder).exists()


def test_run_json_cannot_mark_a_folder_without_weights_finished(tmp_path):
    with pytest.raises(FileNotFoundError, match="save the model there first"):
        save_run(tmp_path, SETTINGS)


def test_settings_are_stored_as_plain_json(tmp_path, decoder):
    import numpy as np
    finish_run(decoder, tmp_path / "d", {"alpha": np.float32(0.5), "ws": (1, 4)},
               history={"eval": [float("nan")]})
    saved = json.loads((tmp_path / "d" / "run.json").read_text())
    assert saved["settings"] == {"alpha": 0.5, "ws": [1, 4]}
    assert saved["history"]["eval"] == ["nan"]
    assert finished_run(tmp_path / "d", {"alpha": np.float32(0.5), "ws": (1, 4)}) is not None
