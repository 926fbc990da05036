"""Argument checks (helpers.validate): what they accept, and what they say."""

import numpy as np
import pytest
import torch

from helpers.validate import ArgumentTypeError, check_float, check_int, check_str


def test_numpy_scalars_and_zero_dimensional_tensors_count_as_numbers():
    assert check_float("alpha", np.float32(0.25)) == 0.25
    assert check_float("alpha", torch.tensor(0.5)) == 0.5
    assert check_int("k", np.int64(3)) == 3 and check_int("k", 4.0) == 4


def test_a_number_in_quotes_is_refused_with_the_argument_and_an_example():
    with pytest.raises(ArgumentTypeError, match=r"temperature must be a number; got '0.7' "
                                                r"\(str\)\. Pass a float such as "
                                                r"temperature=0.7 \(no quotes\)"):
        check_float("temperature", "0.7", example=0.7)


def test_a_fraction_where_a_count_belongs_is_refused():
    with pytest.raises(ArgumentTypeError, match="max_new_tokens must be a whole number; got 2.5"):
        check_int("max_new_tokens", 2.5, 1, example=64)


def test_type_errors_are_value_errors_too_so_existing_handlers_catch_them():
    with pytest.raises(ValueError):
        check_int("k", "3")


def test_bytes_are_told_to_be_decoded_not_called_empty():
    with pytest.raises(ArgumentTypeError, match=r"prompt\.decode\('utf-8'\)"):
        check_str("prompt", b"What is personal data?")
