"""benchmarks/ab_inprocess.py: another build's extension loaded beside this
one, bnfast's modules switched between them round by round, and restored."""

from __future__ import annotations

import importlib.util
import os
import shutil

import numpy as np
import pytest

import bnfast

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "ab_inprocess.py")
if not os.path.exists(PATH):
    pytest.skip("benchmarks/ab_inprocess.py is not in this tree", allow_module_level=True)
_spec = importlib.util.spec_from_file_location("bnfast_ab_inprocess", PATH)
ab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ab)


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """A second copy of this build's extension, under another path."""
    copy = tmp_path_factory.mktemp("other") / os.path.basename(bnfast._kernels.__file__)
    shutil.copy(bnfast._kernels.__file__, copy)
    return ab.load_other(str(copy))


def test_the_other_build_is_a_module_of_its_own_and_this_one_stays_imported(other):
    import sys

    assert other is not bnfast._kernels and sys.modules["bnfast._kernels"] is bnfast._kernels
    assert other.__file__ != bnfast._kernels.__file__
    x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
    w, b = np.ones(3, np.float32), np.zeros(3, np.float32)
    y, mean, invstd = np.empty_like(x), np.empty(3, np.float32), np.empty(3, np.float32)
    mine = bnfast.batch_norm_forward(x)
    other.forward_train(x.shape, x, (15, 5, 0), y, (15, 5, 0), w, b, None, None, 0.1, 1e-5, mean, invstd, None)
    np.testing.assert_array_equal(y, mine[0])  # the same kernels, called through the other copy


def test_compare_swaps_every_user_and_restores_them(other):
    users = ab._users()
    assert bnfast._functional in users and bnfast._normalization in users
    seen = []

    class Spy:  # the other build's module, its kernel calls counted per case
        def __getattr__(self, name):
            attr = getattr(other, name)
            if name.startswith(("try_", "forward", "backward", "inference")):
                seen.append(name)
            return attr

    rows = ab.compare(Spy(), ["train:2x3x4x4", "layer_norm/forward:8x16"], threads=1, rounds=2, calls=1)
    assert [r[0] for r in rows] == ["train 2x3x4x4 NCHW float32", "layer_norm/forward 8x16 rows float32"]
    assert all(t > 0 for _, *times in rows for t in times)
    # per case, two rounds of a warm-up call and one timed call went to the other build
    assert seen.count("try_forward_train") >= 4 and seen.count("try_rows_forward") >= 4
    assert all(m._kernels is bnfast._kernels for m in users)


def test_refuses_this_builds_own_extension_and_bad_cases():
    with pytest.raises(SystemExit, match="own extension"):
        ab.load_other(bnfast._kernels.__file__)
    with pytest.raises(SystemExit, match="bad case"):
        ab.case_fn("train")
