"""Bad inputs through the public helpers: every error names the problem and the next step.

The table lives in ``tests/bad_inputs.py`` (wrong types and values of every numeric and
text argument, damaged files, saves into occupied folders or onto a full disk, mismatched
pieces, no network); ``scripts/sweep_bad_inputs.py`` runs the same table and counts.
"""

import pytest

import bad_inputs

CASES = bad_inputs.all_cases()


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    import os
    root = tmp_path_factory.mktemp("bad_inputs")
    old = os.environ.get("MEMDEC_DATA_DIR")
    os.environ["MEMDEC_DATA_DIR"] = str(root)
    yield bad_inputs.make_context(root)
    if old is None:
        os.environ.pop("MEMDEC_DATA_DIR")
    else:
        os.environ["MEMDEC_DATA_DIR"] = old


def test_the_table_covers_at_least_250_bad_inputs():
    assert len(CASES) >= 250
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_bad_input_gets_a_clear_error_or_a_correct_recovery(case, ctx):
    outcome = bad_inputs.run_case(case, ctx)
    wanted = "recovered" if case.check is not None else "clear"
    assert outcome.kind == wanted, f"{outcome.kind}: {outcome.message}"


def test_an_error_without_advice_is_not_counted_as_clear(ctx):
    vague = bad_inputs.Case("vague", lambda c: (_ for _ in ()).throw(ValueError("k is bad")),
                            "k")
    assert bad_inputs.run_case(vague, ctx).kind == "unclear"


def test_a_save_that_deletes_a_kept_file_is_counted_as_data_loss(ctx, tmp_path):
    victim = tmp_path / "notes.txt"
    victim.write_text("keep")
    lossy = bad_inputs.Case("lossy", lambda c: victim.unlink(), "notes",
                            keep=lambda c: {"before": {victim: b"keep"}})
    assert bad_inputs.run_case(lossy, ctx).kind == "lost"
