"""Shared argument checks (dolfinx_mno.validation): caller-supplied arrays."""

import numpy as np
import pytest

from dolfinx_mno.validation import check_array, output_array


def test_check_array_names_the_array_and_what_it_must_be():
    check_array(np.zeros((2, 3)), (2, 3), np.float64, "block")  # fits: no error
    with pytest.raises(TypeError) as info:
        check_array(np.zeros((3, 2)), (2, 3), np.float64, "block")
    assert str(info.value) == (
        "block must have shape (2, 3) and dtype float64, got (3, 2) and float64."
    )
    with pytest.raises(TypeError) as info:
        check_array(np.zeros((2, 3), dtype=np.float32), (2, 3), "float64", "out")
    assert str(info.value) == (
        "out must have shape (2, 3) and dtype float64, got (2, 3) and float32."
    )


def test_output_array_returns_the_callers_buffer_or_a_new_one():
    out = np.empty((4, 1), dtype=np.float32)
    assert output_array(out, (4, 1), np.float32) is out
    new = output_array(None, (4, 1), np.float32)
    assert new.shape == (4, 1) and new.dtype == np.float32 and new is not out
    with pytest.raises(TypeError, match=r"^out must have shape \(4,\) and dtype float32"):
        output_array(out, (4,), np.float32)
