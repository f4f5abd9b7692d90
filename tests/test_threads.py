"""Thread control: set/get, OpenMP default and threadpoolctl, concurrent callers."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import bnfast
from bnfast import _reference as ref


def test_set_num_threads_none_restores_openmp_default():
    default = bnfast.get_num_threads()
    bnfast.set_num_threads(3)
    assert bnfast.get_num_threads() == 3
    bnfast.set_num_threads(None)
    assert bnfast.get_num_threads() == default


@pytest.mark.parametrize("bad", [0, -1, 10**5, 2**31, 2**70])
def test_set_num_threads_rejects_out_of_range_counts(bad):
    before = bnfast.get_num_threads()
    with pytest.raises(ValueError, match="number of threads"):
        bnfast.set_num_threads(bad)
    assert bnfast.get_num_threads() == before


@pytest.mark.parametrize("bad", [1.5, 2.0, "2", True, np.bool_(True), [2]])
def test_set_num_threads_rejects_non_integers(bad):
    before = bnfast.get_num_threads()
    with pytest.raises(TypeError, match="number of threads"):
        bnfast.set_num_threads(bad)
    assert bnfast.get_num_threads() == before


def test_threadpoolctl_limit_is_honoured_by_default():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not bnfast._kernels.openmp_enabled():
        pytest.skip("serial build: no OpenMP runtime to limit")
    bnfast.set_num_threads(None)
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert bnfast.get_num_threads() == 1
        x = np.random.default_rng(0).standard_normal((16, 8, 32, 32))
        y, _, _ = bnfast.batch_norm_forward(x)
    np.testing.assert_allclose(y, ref.batch_norm_forward(x)[0], atol=1e-12)


def test_concurrent_callers_get_their_own_results():
    """The GIL is released in the kernels; concurrent calls share no scratch."""
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((8, 16, 40, 40)) * (i + 1) + i for i in range(4)]
    expected = [ref.batch_norm_forward(x)[0] for x in inputs]
    results = [None] * len(inputs)

    def work(i):
        for _ in range(3):
            results[i] = bnfast.batch_norm_forward(inputs[i])[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        np.testing.assert_allclose(got, want, atol=1e-11)
