"""Distributed batch normalization and data-parallel training (issue 13).

The multi-rank checks run under a real ``mpiexec`` (the MPICH wheel's, next to
the interpreter, oversubscribing the cores) as one subprocess per rank count,
each running ``tests/_mpi_checks.py`` -- SyncBatchNorm on uneven slices against
BatchNorm on the concatenated batch, the error cases on every rank,
recalibrate and fit -- with a timeout, so that a hang fails instead of
blocking.  They skip where mpi4py or mpiexec is missing.  The in-process tests
use a one-rank stand-in for a communicator and need no MPI at all.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import bnfast
from bnfast import BatchNorm, SyncBatchNorm, nn
from bnfast.distributed import allreduce_moments

HERE = Path(__file__).resolve().parent
TIMEOUT = 240  # seconds per mpiexec run; they take a few seconds on 2 busy cores


# ---------------------------------------------------------------- running real MPI
def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"  # the mpich wheel's, matching mpi4py's library
    if beside.exists():
        return str(beside)
    return shutil.which("mpiexec")


def _run_mpi(n: int, args: list[str]) -> subprocess.CompletedProcess:
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install 'bnfast[mpi]')")
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec found (pip install 'bnfast[mpi]' brings MPICH's)")
    env = dict(os.environ)
    src = str(Path(bnfast.__file__).resolve().parent.parent)  # the bnfast under test
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # n ranks x OpenMP threads on 2 cores would only spin
    env["MPIEXEC_TIMEOUT"] = str(TIMEOUT)  # hydra kills the job itself after that
    proc = subprocess.Popen([mpiexec, "-n", str(n), sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT + 30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"mpiexec -n {n} hung (killed after {TIMEOUT + 30} s)\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("ranks", [2, 3])
def test_mpi_checks(ranks):
    """SyncBatchNorm, allreduce_moments, errors, convert, recalibrate and fit on `ranks` processes."""
    r = _run_mpi(ranks, [str(HERE / "_mpi_checks.py"), str(ranks)])
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    ok = sorted(int(rank) for rank, _ in re.findall(r"OK (\d+) (\d+)", r.stdout))  # ranks' lines may interleave
    assert ok == list(range(ranks)), r.stdout
    assert "max |SyncBatchNorm - BatchNorm|" in r.stdout


def test_demo_data_parallel():
    """`mpiexec -n 2 python -m bnfast demo` trains data-parallel, says so, and prints once."""
    r = _run_mpi(2, ["-m", "bnfast", "demo", "--epochs", "3"])
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert r.stdout.count("data-parallel over 2 processes") == 1, r.stdout
    assert r.stdout.count("with BN") >= 1 and r.stdout.count("digits:") == 1, r.stdout


# ---------------------------------------------------------------- without mpi4py
def test_import_without_mpi4py():
    """`import bnfast` works without mpi4py; the distributed names say what to install."""
    code = textwrap.dedent("""
        import sys
        sys.modules["mpi4py"] = None  # as if it were not installed
        import numpy as np
        import bnfast
        from bnfast import nn
        from bnfast.distributed import allreduce_moments, get_comm
        for make in (lambda: bnfast.SyncBatchNorm(3), lambda: allreduce_moments(bnfast.Moments.zeros(3)),
                     lambda: bnfast.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm1d(3)), get_comm):
            try:
                make()
            except ImportError as exc:
                assert 'pip install "bnfast[mpi]"' in str(exc) and "mpi4py" in str(exc), exc
            else:
                raise AssertionError("no ImportError")
        bn = bnfast.BatchNorm1d(3)          # the rest works
        bn(np.ones((4, 3), np.float32) * np.arange(4, dtype=np.float32)[:, None])
        print("fine")
    """)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(bnfast.__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "fine", r.stderr


# ---------------------------------------------------------------- one rank, no MPI
class OneRank:
    """The subset of mpi4py's Comm that bnfast uses, for a world of one process."""

    def __init__(self):
        self.calls = 0

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def Allgather(self, send, recv):
        self.calls += 1
        recv[...] = np.asarray(send).reshape(recv.shape)

    def Reduce(self, send, recv, root=0):
        self.calls += 1
        recv[...] = send

    def Bcast(self, buf, root=0):
        self.calls += 1

    def allgather(self, obj):
        self.calls += 1
        return [obj]

    def bcast(self, obj, root=0):
        self.calls += 1
        return obj


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_one_rank_equals_batch_norm(dtype, axis, momentum):
    rng = np.random.default_rng(3)
    shape = (6, 4, 5) if axis == 1 else (6, 5, 4)
    ref = BatchNorm(4, momentum=momentum, axis=axis, dtype=dtype)
    comm = OneRank()
    sbn = SyncBatchNorm(4, momentum=momentum, axis=axis, dtype=dtype, comm=comm)
    tol = 1e-13 if dtype == np.float64 else 3e-6
    for step in range(3):
        x = (10.0 * step + rng.standard_normal(shape)).astype(dtype)
        g = rng.standard_normal(shape).astype(dtype)
        np.testing.assert_allclose(sbn(x), ref(x), rtol=0, atol=tol)
        np.testing.assert_allclose(sbn.backward(g), ref.backward(g), rtol=0, atol=tol * 10)
        np.testing.assert_allclose(sbn.weight.grad, ref.weight.grad, rtol=tol * 10, atol=tol * 10)
        np.testing.assert_allclose(sbn.bias.grad, ref.bias.grad, rtol=tol, atol=tol)
        np.testing.assert_allclose(sbn.running_var, ref.running_var, rtol=tol)
        np.testing.assert_allclose(sbn.running_mean, ref.running_mean, rtol=tol)
    assert int(sbn.num_batches_tracked) == 3
    assert comm.calls == 9  # forward: header + statistics; backward: the sums
    sbn.eval()
    calls = comm.calls
    x = rng.standard_normal(shape).astype(dtype)
    ref.eval()
    np.testing.assert_allclose(sbn(x), ref(x), rtol=0, atol=tol)  # running statistics equal to round-off
    np.testing.assert_allclose(sbn.backward(x), ref.backward(x), rtol=0, atol=tol)
    assert comm.calls == calls  # eval mode: no communication


def test_one_rank_large_offset_float32():
    """float32 at an offset of 1e5: the statistics and the centred apply keep the output accurate."""
    rng = np.random.default_rng(4)
    x = (1e5 + rng.standard_normal((16, 3, 8))).astype(np.float32)
    y = SyncBatchNorm(3, comm=OneRank())(x)
    x64 = x.astype(np.float64)
    exact = (x64 - x64.mean(axis=(0, 2), keepdims=True)) / np.sqrt(x64.var(axis=(0, 2), keepdims=True) + 1e-5)
    assert np.max(np.abs(y - exact)) < 2e-6


def test_one_rank_gradcheck():
    """Finite differences of SyncBatchNorm (float64, one rank) through the statistics."""
    bn = SyncBatchNorm(3, dtype=np.float64, comm=OneRank())
    bn.weight[...] = [0.5, 1.5, -2.0]
    bn.bias[...] = [0.1, 0.0, 0.3]
    assert bnfast.testing.gradcheck(bn, np.random.default_rng(5).standard_normal((4, 3, 2)))


def test_one_rank_errors_change_nothing():
    sbn = SyncBatchNorm(3, dtype=np.float64, comm=OneRank())
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        sbn(np.ones((1, 3)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        sbn(np.ones((0, 3, 4)))
    with pytest.raises(ValueError, match="channels"):
        sbn(np.ones((4, 2)))
    with pytest.raises(TypeError):
        sbn(np.ones((4, 3), np.float32))
    with pytest.raises(RuntimeError, match="before forward"):
        sbn.backward(np.ones((4, 3)))
    assert int(sbn.num_batches_tracked) == 0 and np.array_equal(sbn.running_var, np.ones(3))
    assert sbn._saved is None
    x = np.arange(12.0).reshape(4, 3)
    sbn(x)
    with pytest.raises(ValueError, match="grad_out has shape"):
        sbn.backward(np.ones((5, 3)))
    assert sbn.weight.grad is None
    with pytest.raises(TypeError, match="Moments"):
        allreduce_moments(np.zeros(3), OneRank())


def test_convert_sync_batchnorm_keeps_state():
    inner = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, rng=0), nn.BatchNorm2d(4, momentum=None, eps=1e-3))
    shared = nn.BatchNorm1d(4, affine=False, dtype=np.float64)
    model = nn.Sequential(inner, nn.ReLU())
    inner[1].running_mean[...] = [1, 2, 3, 4]
    inner[1].num_batches_tracked[...] = 7
    inner[1].eval()
    before = model.state_dict()
    weight = inner[1].weight
    comm = OneRank()
    out = SyncBatchNorm.convert_sync_batchnorm(model, comm)
    assert out is model and isinstance(inner[1], SyncBatchNorm)
    sbn = inner[1]
    assert sbn.weight is weight and sbn.comm is comm and not sbn.training
    assert (sbn.eps, sbn.momentum, sbn.num_features) == (1e-3, None, 4)
    after = model.state_dict()
    assert list(after) == list(before) and all(np.array_equal(after[k], before[k]) for k in before)
    pair = SyncBatchNorm.convert_sync_batchnorm((shared, nn.ReLU(), shared), comm)
    assert isinstance(pair, tuple) and pair[0] is pair[2] and isinstance(pair[0], SyncBatchNorm)
    assert pair[0].weight is None and pair[0].dtype == np.float64
    assert SyncBatchNorm.convert_sync_batchnorm(sbn, comm) is sbn


def test_fit_and_recalibrate_on_one_rank_match_local():
    """With a one-process communicator, fit and recalibrate give the single-process results."""
    rng = np.random.default_rng(6)
    X = rng.standard_normal((50, 5))
    y = (X[:, 0] > 0).astype(np.int64)

    def model():
        return nn.Sequential(nn.Linear(5, 6, rng=1, dtype=np.float64), nn.BatchNorm1d(6, dtype=np.float64),
                             nn.ReLU(), nn.Linear(6, 2, rng=2, dtype=np.float64))

    a, b = model(), model()
    hists = []
    for m, comm in ((a, None), (b, OneRank())):
        opt = nn.SGD(m.parameters(), lr=0.1, momentum=0.9)
        hists.append(nn.fit(m, nn.CrossEntropyLoss(), opt, X, y, epochs=2, batch_size=8, seed=0,
                            progress=False, validation_data=(X[:9], y[:9]), comm=comm))
    for p, q in zip(a.parameters(), b.parameters()):
        np.testing.assert_allclose(p, q, rtol=0, atol=1e-14)
    for k in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(hists[0][k], hists[1][k], rtol=1e-14)
    batches = [rng.standard_normal((7, 5)) for _ in range(3)]
    bnfast.recalibrate(a, batches)
    bnfast.recalibrate(b, batches, comm=OneRank())
    np.testing.assert_allclose(a[1].running_var, b[1].running_var, rtol=1e-14)
    assert int(b[1].num_batches_tracked) == 3


# ---------------------------------------------------------------- several ranks as threads, no MPI
class ThreadWorld:
    """P ranks as threads of this process: mpi4py's collectives on a shared slot list and a barrier.

    The barrier has a timeout, so a rank that skipped a collective breaks it
    (threading.BrokenBarrierError) instead of hanging the test.
    """

    def __init__(self, size: int):
        import threading

        self.size = size
        self.slots: list = [None] * size
        self.barrier = threading.Barrier(size, timeout=60)

    def comm(self, rank: int) -> "ThreadRank":
        return ThreadRank(self, rank)

    def run(self, fn):
        """``fn(comm)`` on every rank; the results in rank order (a rank's exception re-raised)."""
        import threading

        results: list = [None] * self.size

        def target(r):
            try:
                results[r] = ("ok", fn(self.comm(r)))
            except BaseException as exc:  # noqa: BLE001 - handed back to the test
                results[r] = ("error", exc)

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results


class ThreadRank:
    def __init__(self, world: ThreadWorld, rank: int):
        self.world, self.rank = world, rank

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.world.size

    def _exchange(self, value):
        w = self.world
        w.slots[self.rank] = value
        w.barrier.wait()
        table = list(w.slots)
        w.barrier.wait()
        return table

    def Allgather(self, send, recv):
        recv[...] = np.stack(self._exchange(np.array(send, copy=True))).reshape(recv.shape)

    def Reduce(self, send, recv, root=0):
        table = self._exchange(np.array(send, copy=True))
        if self.rank == root:
            recv[...] = sum(table[1:], table[0].copy())

    def Bcast(self, buf, root=0):
        buf[...] = self._exchange(np.array(buf, copy=True))[root]

    def allgather(self, obj):
        return self._exchange(obj)

    def bcast(self, obj, root=0):
        return self._exchange(obj)[root]


from hypothesis import given, strategies as st  # noqa: E402


@given(
    sizes=st.lists(st.integers(0, 5), min_size=2, max_size=4).filter(lambda s: sum(s) >= 2),
    axis=st.sampled_from([1, -1]),
    spatial=st.sampled_from([(), (3,), (2, 3)]),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**16),
)
def test_thread_ranks_equal_batch_norm_on_the_whole_batch(sizes, axis, spatial, dtype, seed):
    """Uneven slices on 2-4 ranks (some empty) against BatchNorm on the concatenation."""
    rng = np.random.default_rng(seed)
    C, n = 3, sum(sizes)
    shape = (n, C) + spatial if axis == 1 else (n,) + spatial + (C,)
    if axis == -1 and not spatial:
        shape = (n, C)
    x = (20.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    # the float64 layer on the same (float32-valued) data is the reference for both dtypes
    ref = BatchNorm(C, axis=axis, dtype=np.float64)
    ref.weight[...] = [0.5, 2.0, -1.0]
    y_ref = ref(x.astype(np.float64))
    gx_ref = ref.backward(g.astype(np.float64))
    ax = axis % x.ndim
    invstd = 1.0 / np.sqrt(np.moveaxis(x.astype(np.float64), ax, -1).reshape(-1, C).var(axis=0) + 1e-5)
    term = 2.0 * float(invstd.max()) * float(np.abs(g).max())  # size of the terms that cancel in grad_input
    starts = np.concatenate([[0], np.cumsum(sizes)])

    def rank_step(comm):
        lo, hi = starts[comm.rank], starts[comm.rank + 1]
        bn = SyncBatchNorm(C, axis=axis, dtype=dtype, comm=comm)
        bn.weight[...] = [0.5, 2.0, -1.0]
        y = bn(x[lo:hi])
        return y, bn.backward(g[lo:hi]), bn.weight.grad, bn.bias.grad, bn.running_var.copy()

    results = ThreadWorld(len(sizes)).run(rank_step)
    assert all(kind == "ok" for kind, _ in results), results
    outs = [value for _, value in results]
    tol = 1e-12 if dtype == np.float64 else 1e-5
    gsum = float(np.abs(g).sum()) / C + 1.0  # size of the per-channel gradient sums
    np.testing.assert_allclose(np.concatenate([o[0] for o in outs]), y_ref, rtol=0, atol=tol * 10)
    np.testing.assert_allclose(np.concatenate([o[1] for o in outs]), gx_ref, rtol=0, atol=tol * term)
    np.testing.assert_allclose(sum(o[2].astype(np.float64) for o in outs), ref.weight.grad, rtol=0, atol=tol * gsum * 4)
    np.testing.assert_allclose(sum(o[3].astype(np.float64) for o in outs), ref.bias.grad, rtol=0, atol=tol * gsum)
    for o in outs:
        np.testing.assert_array_equal(o[4], outs[0][4])  # bit-identical on every rank
        np.testing.assert_allclose(o[4], ref.running_var, rtol=tol)


def test_thread_ranks_errors_raise_everywhere():
    """A bad rank raises its own error, the others a ValueError naming it; nothing changes; no hang."""
    world = ThreadWorld(3)

    def rank_step(comm):
        bn = SyncBatchNorm(2, dtype=np.float64, comm=comm)
        x = np.ones((2, 3 if comm.rank == 1 else 2))
        try:
            bn(x)
        except (ValueError, TypeError) as exc:
            return type(exc).__name__, str(exc), int(bn.num_batches_tracked)
        return "no error", "", int(bn.num_batches_tracked)

    results = [value for _, value in world.run(rank_step)]
    assert results[1][0] == "ValueError" and "channels" in results[1][1]
    for r in (0, 2):
        assert results[r][0] == "ValueError" and "rank(s) [1]" in results[r][1]
    assert all(r[2] == 0 for r in results)
