"""threadpoolctl sees bnfast's thread count and limits it (bnfast._threadpool)."""

from __future__ import annotations

import os

import numpy as np
import pytest

import bnfast
from bnfast import _functional, _kernels, _threadpool

threadpoolctl = pytest.importorskip("threadpoolctl")
if not hasattr(threadpoolctl, "register"):
    pytest.skip("threadpoolctl without register() (< 3.3)", allow_module_level=True)


def _bnfast_entries():
    return [i for i in threadpoolctl.threadpool_info() if i["internal_api"] == "bnfast"]


def test_threadpool_info_lists_bnfast_once_with_its_thread_count():
    bnfast.set_num_threads(1)
    (entry,) = _bnfast_entries()
    assert entry["user_api"] == "openmp"
    assert entry["num_threads"] == 1 == bnfast.get_num_threads()
    assert os.path.samefile(entry["filepath"], _kernels.__file__)
    assert entry["version"] == bnfast.__version__
    assert entry["openmp_enabled"] is _kernels.openmp_enabled()
    bnfast.set_num_threads(None)
    (entry,) = _bnfast_entries()
    assert entry["num_threads"] == bnfast.get_num_threads()


def test_limit_applies_over_an_explicit_count_and_restores_it():
    bnfast.set_num_threads(2)
    with threadpoolctl.threadpool_limits(limits=1):
        assert bnfast.get_num_threads() == 1
        x = np.random.default_rng(0).standard_normal((4, 3, 8, 8))
        bnfast.batch_norm_forward(x)
    assert bnfast.get_num_threads() == (2 if _kernels.openmp_enabled() else 1)
    assert _functional._requested == 2  # still an explicit count


def test_openmp_limit_restores_following_the_default():
    bnfast.set_num_threads(None)
    default = bnfast.get_num_threads()
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert bnfast.get_num_threads() == 1
    assert _functional._requested is None  # follows OpenMP's default again
    assert bnfast.get_num_threads() == default


def test_blas_limit_leaves_bnfast_alone():
    bnfast.set_num_threads(2)
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        assert _functional._requested == 2
    assert _functional._requested == 2


def test_nested_limits_unwind():
    bnfast.set_num_threads(None)
    controller = threadpoolctl.ThreadpoolController()
    with controller.limit(limits=1):
        with controller.limit(limits=2):
            assert bnfast.get_num_threads() == (2 if _kernels.openmp_enabled() else 1)
        assert bnfast.get_num_threads() == 1
    assert _functional._requested is None


def test_limit_above_bnfast_bound_is_clamped():
    bnfast.set_num_threads(None)
    default = bnfast.get_num_threads()
    with threadpoolctl.threadpool_limits(limits=10**6):  # no ValueError from set_num_threads
        # pinned to the bound, or following libgomp's new default capped to it,
        # depending on which library threadpoolctl limits first
        assert bnfast.get_num_threads() == (_kernels.max_threads() if _kernels.openmp_enabled() else 1)
    assert _functional._requested is None
    assert bnfast.get_num_threads() == default


def test_serial_build_reports_one_thread():
    if _kernels.openmp_enabled():
        pytest.skip("OpenMP build")
    bnfast.set_num_threads(4)
    assert bnfast.get_num_threads() == 1
    assert bnfast._config.config()["threads"] == 1
    assert _bnfast_entries()[0]["num_threads"] == 1


def test_register_is_idempotent():
    assert _threadpool.register() is True
    assert _threadpool.register() is True
    assert len(_bnfast_entries()) == 1


def test_other_kernels_extension_is_not_claimed(tmp_path):
    other = tmp_path / "_kernels.so"
    other.write_bytes(b"")
    assert not _threadpool._same_file(str(other), _kernels.__file__)
    assert _threadpool._same_file(_kernels.__file__, _kernels.__file__)
