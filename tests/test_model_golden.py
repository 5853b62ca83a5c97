"""Golden regression of ``convlm_test`` (seed-0 init) against ``tests/golden/convlm_test.npz``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

GOLDEN_DIR = Path(__file__).with_name("golden")


@pytest.fixture(scope="module")
def golden():
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN_DIR / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with np.load(GOLDEN_DIR / "convlm_test.npz") as data:
        stored = {k: data[k] for k in data.files}
    return module, stored


def test_golden_input_is_reproducible(golden):
    module, stored = golden
    np.testing.assert_array_equal(module.make_input().numpy(), stored["x"])


def test_outputs_match_golden(golden):
    module, stored = golden
    fresh = module.compute(torch.from_numpy(stored["x"]))
    assert sorted(fresh) == sorted(stored)
    for key, want in stored.items():
        got = fresh[key]
        assert got.shape == want.shape and got.dtype == want.dtype, key
        if np.issubdtype(want.dtype, np.integer):
            np.testing.assert_array_equal(got, want, err_msg=key)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=key)
    # the three forward modes really differ, so each golden guards its own path
    assert np.abs(stored["feat_full"] - stored["feat_refined"]).max() > 1e-2
    assert np.abs(stored["feat_context"] - stored["feat_refined"]).max() > 1e-4
    assert stored["kept_1"].shape == (4, 12) and stored["kept_2"].shape == (4, 10)
