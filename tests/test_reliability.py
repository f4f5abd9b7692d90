"""Regression tests for the reliability defects of issue 10: byte order,
aliasing, alignment, thread bounds, fork, interrupts, broadcast input and
argument types.  Each failing call must leave every array it was given as it
was."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback

import numpy as np
import pytest

import bnfast
from bnfast import _reference as ref

DTYPES = [np.float32, np.float64]
SHAPE = (6, 4, 5)
C = SHAPE[1]


def data(dtype, seed=0):
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    x = (rng.standard_normal(SHAPE) * 2 + 3).astype(dt)
    return dict(
        x=x,
        g=rng.standard_normal(SHAPE).astype(dt),
        w=rng.uniform(0.5, 2.0, C).astype(dt),
        b=rng.standard_normal(C).astype(dt),
        rm=rng.standard_normal(C).astype(dt),
        rv=rng.uniform(0.5, 2.0, C).astype(dt),
    )


def swapped(a):
    """The same values in the other byte order."""
    return a.astype(a.dtype.newbyteorder("S"))


def unaligned(a):
    """The same values in memory that is not aligned for the dtype."""
    buf = np.empty(a.nbytes + 1, np.uint8)
    u = buf[1:].view(a.dtype).reshape(a.shape)
    u[...] = a
    assert not u.flags.aligned
    return u


def assert_same(got, want):
    assert np.asarray(got).dtype.newbyteorder("=") == np.asarray(want).dtype.newbyteorder("=")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ---------------------------------------------------------------- byte order and alignment

CONVERSIONS = {"byteswapped": swapped, "unaligned": unaligned}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("convert", list(CONVERSIONS))
@pytest.mark.parametrize("which", ["x", "w", "b", "rm", "rv", "out", "all"])
def test_forward_with_foreign_memory_equals_native(dtype, convert, which):
    conv = CONVERSIONS[convert]
    A, B = data(dtype), data(dtype)
    want = bnfast.batch_norm_forward(A["x"], A["w"], A["b"], A["rm"], A["rv"], momentum=0.3)
    args = {k: (conv(v) if which in (k, "all") else v) for k, v in B.items()}
    out = conv(np.zeros(SHAPE, dtype)) if which in ("out", "all") else None
    got = bnfast.batch_norm_forward(args["x"], args["w"], args["b"], args["rm"], args["rv"],
                                    momentum=0.3, out=out)
    for g, w in zip(got, want):
        assert_same(g, w)
    # running statistics updated in place, in their own memory and byte order
    assert_same(args["rm"], A["rm"])
    assert_same(args["rv"], A["rv"])
    if out is not None:
        assert got[0] is out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("convert", list(CONVERSIONS))
def test_inference_backward_moments_with_foreign_memory_equal_native(dtype, convert):
    conv = CONVERSIONS[convert]
    A = data(dtype)
    F = {k: conv(v) for k, v in A.items()}
    out = conv(np.zeros(SHAPE, dtype))
    assert_same(bnfast.batch_norm_inference(F["x"], F["rm"], F["rv"], F["w"], F["b"], out=out),
                bnfast.batch_norm_inference(A["x"], A["rm"], A["rv"], A["w"], A["b"]))
    _, sm, si = bnfast.batch_norm_forward(A["x"])
    for training in (True, False):
        want = bnfast.batch_norm_backward(A["g"], A["x"], sm, si, A["w"], training=training)
        out = conv(np.zeros(SHAPE, dtype))
        got = bnfast.batch_norm_backward(F["g"], F["x"], conv(sm), conv(si), F["w"],
                                         training=training, out=out)
        assert got[0] is out
        for g, w in zip(got, want):
            assert_same(g, w)
    m_want, m_got = bnfast.moments(A["x"]), bnfast.moments(F["x"])
    for field in ("count", "mean", "m2"):
        assert_same(getattr(m_got, field), getattr(m_want, field))


def test_big_endian_layer_state_and_input():
    bn = bnfast.BatchNorm1d(C)
    ref_bn = bnfast.BatchNorm1d(C)
    x = data(np.float32)["x"]
    bn.load_state_dict({k: swapped(np.asarray(v)) for k, v in ref_bn.state_dict().items()})
    for _ in range(3):
        assert_same(bn(swapped(x)), ref_bn(x))
    for k, v in ref_bn.state_dict().items():
        assert_same(bn.state_dict()[k], v)
    assert np.isfinite(bn.running_var).all()


# ---------------------------------------------------------------- aliasing


@pytest.mark.parametrize("dtype", DTYPES)
def test_running_stats_that_alias_are_refused_and_untouched(dtype):
    A = data(dtype)
    x = A["x"]
    flat = x.reshape(-1)
    cases = {
        "view of x": (flat[:C], A["rv"], None),
        "same array": (A["rm"], A["rm"], None),
        "overlapping views": (np.arange(C + 1, dtype=dtype)[:C], None, None),
        "out overlaps running_var": (A["rm"], None, "rv"),
    }
    for what, (rm, rv, out_over) in cases.items():
        if rv is None and out_over is None:  # the two halves of one buffer, overlapping by C-1
            buf = np.arange(C + 1, dtype=dtype)
            rm, rv = buf[:C], buf[1:]
        out = None
        if out_over == "rv":
            rv = np.ones(SHAPE, dtype).reshape(-1)[:C]  # running_var is the start of out
            out = rv.base.reshape(SHAPE)
        snap = [(a, a.copy()) for a in (x, rm, rv) + ((out,) if out is not None else ())]
        with pytest.raises(ValueError, match="share"):
            bnfast.batch_norm_forward(x, A["w"], A["b"], rm, rv, out=out)
        for a, before in snap:
            np.testing.assert_array_equal(a, before, err_msg=what)


@pytest.mark.parametrize("dtype", DTYPES)
def test_disjoint_interleaved_running_stats_are_accepted(dtype):
    A = data(dtype)
    buf = np.empty(2 * C, dtype)
    rm, rv = buf[0::2], buf[1::2]
    rm[...], rv[...] = A["rm"], A["rv"]
    want = ref.batch_norm_forward(A["x"], running_mean=A["rm"], running_var=A["rv"])
    bnfast.batch_norm_forward(A["x"], running_mean=rm, running_var=rv)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(rm, want[3], rtol=tol, atol=tol)
    np.testing.assert_allclose(rv, want[4], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_overlapping_read_arguments_gives_the_unaliased_result(dtype):
    A = data(dtype)
    x, w, b = A["x"], A["w"], A["b"]
    want_f = bnfast.batch_norm_forward(x, w, b)[0]
    want_i = bnfast.batch_norm_inference(x, A["rm"], A["rv"], w, b)
    _, sm, si = bnfast.batch_norm_forward(x)
    want_b = bnfast.batch_norm_backward(A["g"], x, sm, si, w)[0]
    # weight (and bias) inside out
    for op in ("forward", "inference", "backward"):
        buf = np.zeros(SHAPE, dtype)
        flat = buf.reshape(-1)
        wv = flat[:C]
        wv[...] = w
        if op == "forward":
            got = bnfast.batch_norm_forward(x, wv, b, out=buf)[0]
            want = want_f
        elif op == "inference":
            rmv = flat[C : 2 * C]
            rmv[...] = A["rm"]
            got = bnfast.batch_norm_inference(x, rmv, A["rv"], wv, b, out=buf)
            want = want_i
        else:
            smv = flat[C : 2 * C]
            smv[...] = sm
            got = bnfast.batch_norm_backward(A["g"], x, smv, si, wv, out=buf)[0]
            want = want_b
        assert got is buf
        np.testing.assert_array_equal(got, want, err_msg=op)
    # out a shifted view of x's buffer: y is still f(x as it was)
    big = np.zeros(x.size + 7, dtype)
    big[:x.size] = x.reshape(-1)
    xv = big[:x.size].reshape(SHAPE)
    out = big[7:].reshape(SHAPE)
    got = bnfast.batch_norm_forward(xv, w, b, out=out)[0]
    np.testing.assert_array_equal(got, want_f)


# ---------------------------------------------------------------- alignment of every operand


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_unaligned_large_arrays_through_every_op(layout):
    rng = np.random.default_rng(3)
    shape = (4, 9, 7, 5) if layout == "NCHW" else (4, 7, 5, 9)
    axis = 1 if layout == "NCHW" else -1
    x = rng.standard_normal(shape).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    ux, ug = unaligned(x), unaligned(g)
    assert_same(bnfast.batch_norm_forward(ux, axis=axis)[0], bnfast.batch_norm_forward(x, axis=axis)[0])
    _, m, s = bnfast.batch_norm_forward(x, axis=axis)
    assert_same(bnfast.batch_norm_backward(ug, ux, m, s, axis=axis)[0],
                bnfast.batch_norm_backward(g, x, m, s, axis=axis)[0])


# ---------------------------------------------------------------- argument types


A32 = data(np.float32)


@pytest.mark.parametrize(
    "call",
    [
        lambda: bnfast.batch_norm_forward(A32["x"], axis=2**70),
        lambda: bnfast.batch_norm_forward(A32["x"], axis=-(2**70)),
        lambda: bnfast.batch_norm_inference(A32["x"], A32["rm"], A32["rv"], axis=2**70),
        lambda: bnfast.batch_norm_backward(A32["g"], A32["x"], A32["rm"], A32["rv"], axis=2**64),
        lambda: bnfast.moments(A32["x"], axis=2**70),
    ],
)
def test_huge_axis_is_a_value_error(call):
    with pytest.raises(ValueError, match="axis"):
        call()


@pytest.mark.parametrize("name,value", [("momentum", True), ("momentum", np.bool_(False)),
                                        ("eps", True), ("momentum", "0.1"), ("eps", "x"),
                                        ("eps", None), ("momentum", [0.1])])
def test_scalar_arguments_of_the_wrong_type(name, value):
    A = data(np.float32)
    rm0 = A["rm"].copy()
    with pytest.raises(TypeError, match=name):
        bnfast.batch_norm_forward(A["x"], running_mean=A["rm"], running_var=A["rv"], **{name: value})
    np.testing.assert_array_equal(A["rm"], rm0)


@pytest.mark.parametrize("value", ["no", None, 1, 0, [True]])
def test_training_flag_must_be_boolean(value):
    A = data(np.float32)
    with pytest.raises(TypeError, match="training"):
        bnfast.batch_norm_backward(A["g"], A["x"], A["rm"], A["rv"], training=value)
    rm0 = A["rm"].copy()
    with pytest.raises(TypeError, match="training"):
        bnfast.batch_norm(A["x"], A["rm"], A["rv"], training=value)
    np.testing.assert_array_equal(A["rm"], rm0)


def test_numpy_bool_training_flag_is_accepted():
    A = data(np.float32)
    a = bnfast.batch_norm_backward(A["g"], A["x"], A["rm"], A["rv"], training=np.bool_(False))
    b = bnfast.batch_norm_backward(A["g"], A["x"], A["rm"], A["rv"], training=False)
    for p, q in zip(a, b):
        np.testing.assert_array_equal(p, q)


@pytest.mark.parametrize("bad", [-1, np.uint64(2**64 - 1), np.int64(-5)])
def test_negative_or_huge_num_batches_tracked_is_refused(bad):
    bn = bnfast.BatchNorm1d(C, momentum=None)
    bn(data(np.float32)["x"])
    before = {k: v.copy() for k, v in bn.state_dict().items()}
    sd = dict(before)
    sd["num_batches_tracked"] = np.asarray(bad)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        bn.load_state_dict(sd)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        bn.num_batches_tracked = bad
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_forward_with_corrupted_num_batches_tracked_raises_cleanly():
    bn = bnfast.BatchNorm1d(C, momentum=None)
    bn.num_batches_tracked[...] = -1  # written through the exposed array
    rm0 = bn.running_mean.copy()
    with pytest.raises(ValueError, match="num_batches_tracked"):
        bn(data(np.float32)["x"])
    np.testing.assert_array_equal(bn.running_mean, rm0)
    assert int(bn.num_batches_tracked) == -1


def test_fold_checks_eps_and_mode():
    W = np.ones((C, 3))
    bn = bnfast.BatchNorm1d(C, dtype=np.float64)
    with pytest.raises(ValueError, match="training mode"):
        bnfast.fold_batch_norm(W, None, bn)
    bn.eval()
    for bad, exc in [("x", TypeError), (True, TypeError), (None, TypeError), (-1.0, ValueError),
                     (float("nan"), ValueError)]:
        bn.eps = bad
        with pytest.raises(exc, match="eps"):
            bnfast.fold_batch_norm(W, None, bn)


# ---------------------------------------------------------------- broadcast input


def test_moments_of_a_broadcast_array_skip_the_repeats():
    v = np.array([1.0, -2.0, 3.5, 1e6], np.float32)
    x = np.broadcast_to(v, (2**36, 4))  # 2**38 elements: hours if read
    t0 = time.perf_counter()
    m = bnfast.moments(x)
    assert time.perf_counter() - t0 < 1.0
    np.testing.assert_array_equal(m.count, np.full(4, 2**36))
    np.testing.assert_array_equal(m.mean, v.astype(np.float64))
    np.testing.assert_array_equal(m.m2, 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_moments_of_broadcast_blocks_match_the_materialized_array(dtype):
    rng = np.random.default_rng(5)
    base = rng.standard_normal((3, 1, 4, 1, 5)).astype(dtype) + 100
    x = np.broadcast_to(base, (3, 6, 4, 7, 5))
    for axis in (2, -1):
        got = bnfast.moments(x, axis=axis)
        want = bnfast.moments(np.ascontiguousarray(x), axis=axis)
        np.testing.assert_array_equal(got.count, want.count)
        np.testing.assert_allclose(got.mean, want.mean, rtol=1e-14)
        np.testing.assert_allclose(got.m2, want.m2, rtol=1e-10)
    # the channel axis itself broadcast: every channel has the same state
    y = np.broadcast_to(rng.standard_normal((5, 1, 3)), (5, 4, 3))
    m = bnfast.moments(y, axis=1)
    np.testing.assert_array_equal(m.mean, np.full(4, m.mean[0]))


# ---------------------------------------------------------------- fork


def _child_work(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((16, 32, 32, 32)).astype(np.float32)
    y, m, s = bnfast.batch_norm_forward(x)
    return float(np.abs(y.mean(axis=(0, 2, 3))).max()), bnfast.get_num_threads()


def _parallel_call_in_parent():
    bnfast.set_num_threads(2)
    _child_work(0)  # 512K elements: a parallel region where OpenMP is built in


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_child_does_not_hang():
    _parallel_call_in_parent()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: work, report, exit without running pytest's teardown
        try:
            err, threads = _child_work(1)
            os.write(w, f"{err!r} {threads}".encode())
        finally:
            os._exit(0)
    os.close(w)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung in a bnfast call")
    report = os.read(r, 100).decode().split()
    os.close(r)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert float(report[0]) < 1e-4 and report[1] == "1"
    bnfast.set_num_threads(None)


@pytest.mark.skipif(sys.platform != "linux", reason="'fork' start method")
def test_multiprocessing_fork_pool_does_not_hang():
    _parallel_call_in_parent()
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        result = pool.map_async(_child_work, range(4))
        values = result.get(timeout=60)  # raises TimeoutError on a hang
    assert all(err < 1e-4 and threads == 1 for err, threads in values)
    bnfast.set_num_threads(None)


def test_asking_for_threads_in_a_fork_child_warns_and_stays_serial():
    code = textwrap.dedent(
        """
        import os, warnings, numpy as np, bnfast
        bnfast.set_num_threads(2)
        x = np.ones((16, 32, 32, 32), np.float32)
        bnfast.batch_norm_forward(x)
        pid = os.fork()
        if pid == 0:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                bnfast.set_num_threads(2)
            bnfast.batch_norm_forward(x)
            ok = bnfast.get_num_threads() == 1 and any("fork" in str(m.message) for m in w)
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        raise SystemExit(os.waitstatus_to_exitcode(status))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == 0


# ---------------------------------------------------------------- interrupts


def _interrupt_soon(delay):
    def fire():
        time.sleep(delay)
        os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=fire, daemon=True).start()


def _raised_in_kernel(exc):
    return any(f.filename.endswith("_kernels.pyx") for f in traceback.extract_tb(exc.__traceback__))


def _batch_norm_step(x, rm, rv, out=None):
    bnfast.batch_norm_forward(x, running_mean=rm, running_var=rv, out=out)


def _instance_norm_step(x, rm, rv, out=None):
    bnfast.instance_norm_forward(x, running_mean=rm, running_var=rv, axis=-1, out=out)


# (step, shape of 512 MiB of float32 with 4 channels, shape of the same updates, small)
LONG_CALLS = [
    pytest.param(_batch_norm_step, (2**25, 4), (8, 4), id="batch_norm"),
    # one context per sample (1 MiB each), each thread running whole samples
    # of its own; only the caller's thread polls
    pytest.param(_instance_norm_step, (512, 2**16, 4), (512, 8, 4), id="instance_norm-NHWC"),
]


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signals reach the main thread only")
@pytest.mark.parametrize("step,shape,small_shape", LONG_CALLS)
def test_ctrl_c_interrupts_a_long_kernel_and_leaves_state_alone(step, shape, small_shape):
    x = np.full(shape, 5.0, np.float32)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    # the running statistics after k complete updates (mean 5, variance 0)
    small = np.full(small_shape, 5.0, np.float32)
    srm, srv = rm.copy(), rv.copy()
    allowed = [(srm.copy(), srv.copy())]
    for _ in range(60):
        step(small, srm, srv)
        allowed.append((srm.copy(), srv.copy()))
    y = np.empty_like(x)
    _interrupt_soon(0.3)
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt) as info:
        for _ in range(60):
            step(x, rm, rv, out=y)
    elapsed = time.perf_counter() - t0
    assert _raised_in_kernel(info.value), "KeyboardInterrupt did not come from inside a kernel"
    assert elapsed < 0.3 + 1.5
    assert any(np.array_equal(rm, a) and np.array_equal(rv, b) for a, b in allowed), \
        "running statistics changed by an interrupted call"


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signals reach the main thread only")
def test_ctrl_c_interrupts_long_moments():
    x = np.full((2**25, 4), 5.0, np.float32)
    _interrupt_soon(0.2)
    with pytest.raises(KeyboardInterrupt):
        for _ in range(60):
            bnfast.moments(x)
