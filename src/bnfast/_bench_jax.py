"""`python -m bnfast bench --jax`: bnfast's JAX adapter against pure jax.numpy batch norm.

Times, under `jax.jit`, one training step of batch normalization -- the
forward pass and the backward pass, ``jax.value_and_grad`` of
``sum(y * c)`` with respect to x, weight and bias -- for
`bnfast.contrib.jax.batch_norm` and for the same computation written in
`jax.numpy` (which XLA compiles and fuses).  Rounds are interleaved so that
both see the same machine state; each keeps its best time.

Threads: XLA's CPU backend uses one thread per core by default and bnfast is
given as many (``os.cpu_count()``).  ``--threads 1`` asks both for one
thread; XLA's setting (``XLA_FLAGS``) takes effect only if JAX has not yet
started its CPU backend in this process, which the header reports.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from typing import Any, Callable

import numpy as np

from ._functional import get_num_threads, set_num_threads

DEFAULT_SHAPE = (32, 64, 56, 56)
_XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def jnp_batch_norm(x, weight, bias, running_mean, running_var, *, training: bool, momentum: float = 0.1,
                   eps: float = 1e-5, axis: int = 1):  # fmt: skip
    """Batch normalization in plain `jax.numpy` (the comparison; same signature and results
    as `bnfast.contrib.jax.batch_norm`)."""
    import jax.numpy as jnp  # noqa: PLC0415

    axis = axis % x.ndim
    reduce = tuple(i for i in range(x.ndim) if i != axis)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    if training:
        mean = jnp.mean(x, axis=reduce)
        var = jnp.var(x, axis=reduce)
        n = x.size // x.shape[axis]
        new_rm = (1 - momentum) * running_mean + momentum * mean
        new_rv = (1 - momentum) * running_var + momentum * var * (n / (n - 1))
    else:
        mean, var = running_mean, running_var
        new_rm, new_rv = running_mean, running_var
    invstd = 1 / jnp.sqrt(var + eps)
    y = (x - mean.reshape(shape)) * (invstd * weight).reshape(shape) + bias.reshape(shape)
    return y, new_rm, new_rv


def _one_thread_requested(args: argparse.Namespace) -> bool:
    return str(getattr(args, "threads", "")).strip() == "1"


def _configure_xla_threads(one: bool) -> str:
    """Ask XLA for one thread if ``one`` and JAX is not running yet; describe XLA's setting."""
    if not one:
        return "XLA default (one thread per core)"
    if "jax" in sys.modules:
        return "XLA setting unchanged: JAX was imported before the benchmark (set XLA_FLAGS yourself)"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _XLA_ONE_THREAD).strip()
    return f"XLA_FLAGS={os.environ['XLA_FLAGS']}"


def _time_interleaved(fns: dict[str, Callable[[], Any]], rounds: int, budget: float) -> dict[str, float]:
    """Best time of each callable (blocking on its result), rounds interleaved."""
    import jax  # noqa: PLC0415

    best: dict[str, float] = {}
    for name, fn in fns.items():  # compile and warm up, then one timed call
        jax.block_until_ready(fn())
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best[name] = time.perf_counter() - t
    one_round = sum(best.values())
    n = max(rounds, min(100, int(budget / max(one_round, 1e-9))))
    for _ in range(n):
        for name, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn())
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def run_jax(shape: tuple[int, ...] = DEFAULT_SHAPE, *, rounds: int = 5, budget: float = 2.0) -> dict[str, Any]:
    """Time bnfast's JAX adapter and jax.numpy on one float32 channels-first case.

    Returns
    -------
    dict
        ``bnfast_s`` and ``jnp_s`` (best times of one jitted forward+backward,
        seconds), ``ratio`` (``jnp_s / bnfast_s``; > 1: bnfast faster) and
        ``max_abs_diff`` between the two losses' gradients w.r.t. x.
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from .contrib.jax import batch_norm  # noqa: PLC0415

    rng = np.random.default_rng(0)
    C = shape[1]
    x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    c = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    w = jnp.asarray(np.linspace(0.5, 1.5, C, dtype=np.float32))
    b = jnp.asarray(np.linspace(-0.5, 0.5, C, dtype=np.float32))
    rm, rv = jnp.zeros(C, jnp.float32), jnp.ones(C, jnp.float32)

    def step(bn):
        def loss(x, w, b, rm, rv, c):
            y, new_rm, new_rv = bn(x, w, b, rm, rv, training=True)
            return jnp.sum(y * c), (new_rm, new_rv)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

    f_bnfast, f_jnp = step(batch_norm), step(jnp_batch_norm)
    fns = {
        "bnfast": lambda: f_bnfast(x, w, b, rm, rv, c),
        "jnp": lambda: f_jnp(x, w, b, rm, rv, c),
    }
    best = _time_interleaved(fns, rounds, budget)
    gx_a = np.asarray(fns["bnfast"]()[1][0])
    gx_b = np.asarray(fns["jnp"]()[1][0])
    return {
        "shape": tuple(shape), "bnfast_s": best["bnfast"], "jnp_s": best["jnp"],
        "ratio": best["jnp"] / best["bnfast"], "max_abs_diff": float(np.max(np.abs(gx_a - gx_b))),
    }  # fmt: skip


def main_jax(args: argparse.Namespace) -> int:
    """Entry point of ``python -m bnfast bench --jax`` (``--shapes``: the first shape is timed)."""
    if args.shapes:
        shape = tuple(int(v) for v in args.shapes.split(",")[0].split("x"))
        if len(shape) < 2:
            print("--jax needs a shape of at least 2 dimensions", file=sys.stderr)
            return 2
    else:
        shape = DEFAULT_SHAPE
    if importlib.util.find_spec("jax") is None:
        print("--jax needs JAX: pip install jax (or bnfast[jax])", file=sys.stderr)
        return 2
    one = _one_thread_requested(args)
    xla_note = _configure_xla_threads(one)  # before JAX starts its backend
    import jax  # noqa: PLC0415

    before = get_num_threads()
    n = 1 if one else (os.cpu_count() or 1)
    set_num_threads(n)
    try:
        print("bnfast bench --jax")
        print(f"  JAX {jax.__version__} on {jax.default_backend()}; bnfast threads {n}; {xla_note}")
        print(f"  jitted value_and_grad of sum(y * c) w.r.t. x, weight, bias; float32 {shape}, axis=1")
        r = run_jax(shape, rounds=max(args.rounds, 3), budget=args.budget if args.budget is not None else 2.0)
    finally:
        set_num_threads(before)
    print(f"bnfast.contrib.jax.batch_norm: {r['bnfast_s'] * 1e3:9.3f} ms")
    print(f"jax.numpy batch norm:          {r['jnp_s'] * 1e3:9.3f} ms")
    print(f"ratio (jax.numpy time / bnfast time; > 1: bnfast faster): {r['ratio']:.2f}x")
    print(f"max |grad_x difference|: {r['max_abs_diff']:.3g}")
    return 0
