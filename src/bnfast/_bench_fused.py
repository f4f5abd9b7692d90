"""``python -m bnfast bench --fused``: the fused batch norm + residual + activation ops.

Speed: ``relu(BN(x) + z)`` as one fused call against batch norm, add and ReLU
as three NumPy-level operations, and against PyTorch's unfused sequence (if
torch is importable), training forward and inference; the best of interleaved rounds, the
thread count pinned for both libraries.

Memory (tracemalloc, NumPy's allocations): one training step (forward, MSE
loss, backward, SGD step) of Conv-BN-act x 4, measured as the bytes the
forward leaves alive for backward ("retained") and the step's peak above the
memory held before it ("peak"), for Conv-BN-LeakyReLU unfused against fused in
place (InPlace-ABN), and Conv-BN-ReLU unfused against fused (not in place:
ReLU is not invertible).  ``benchmarks/fused.py`` runs the same functions.
"""

from __future__ import annotations

import argparse
import gc
import tracemalloc

import numpy as np

import bnfast
from bnfast import nn


def _stack(kind: str, channels: int, kernel: int, axis: int) -> nn.Sequential:
    """Four Conv-BN-activation blocks, unfused or fused as ``kind`` says."""
    layers: list = []
    for i in range(4):
        conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, axis=axis, rng=i)
        if kind == "leaky_unfused":  # the nested Sequential keeps BN and the activation apart
            layers += [nn.Sequential(conv, nn.BatchNorm2d(channels, axis=axis)), nn.LeakyReLU(0.01)]
        elif kind == "leaky_inplace":
            layers += [conv, nn.BatchNorm2d(channels, axis=axis, activation="leaky_relu", inplace=True)]
        elif kind == "relu_unfused":
            layers += [nn.Sequential(conv, nn.BatchNorm2d(channels, axis=axis)), nn.ReLU()]
        elif kind == "relu_fused":
            layers += [conv, nn.BatchNorm2d(channels, axis=axis), nn.ReLU()]
        else:
            raise ValueError(kind)
    return nn.Sequential(*layers)


def training_step_memory(kind: str, shape=(16, 32, 32, 32), kernel: int = 1, axis: int = -1) -> dict:
    """Bytes retained by the forward and the peak of one training step (tracemalloc)."""
    n, c, h, w = shape
    model = _stack(kind, c, kernel, axis)
    rng = np.random.default_rng(0)
    xshape = (n, c, h, w) if axis == 1 else (n, h, w, c)
    x = rng.standard_normal(xshape).astype(np.float32)
    target = np.zeros(xshape, np.float32)
    loss, opt = nn.MSELoss(), nn.SGD(model.parameters(), lr=0.01)
    for _ in range(2):  # warm up: gradients and optimizer state exist before the measured step
        model(x.copy())
        loss(model(x.copy()), target)
        model.backward(loss.backward())
        opt.step()
    gc.collect()
    xin = x.copy()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    y = model(xin)
    del xin  # the caller's reference: the model keeps what it needs
    retained = tracemalloc.get_traced_memory()[0] - base - y.nbytes
    loss(y, target)
    del y
    model.backward(loss.backward())
    opt.step()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return {"kind": kind, "retained": retained, "peak": peak, "x_bytes": x.nbytes}


def memory_report(shape=(16, 32, 32, 32)) -> list[dict]:
    """Retained and peak memory of a training step, unfused against fused, printed; one dict per run."""
    rows = []
    for kernel, axis in ((1, -1), (3, 1)):
        for pair in (("leaky_unfused", "leaky_inplace"), ("relu_unfused", "relu_fused")):
            base, fused = (training_step_memory(k, shape, kernel, axis) for k in pair)
            for r in (base, fused):
                r.update(kernel=kernel, axis=axis)
                rows.append(r)
            save_r = 1 - fused["retained"] / base["retained"]
            save_p = 1 - fused["peak"] / base["peak"]
            print(f"conv {kernel}x{kernel} axis={axis:2d} {pair[0]:>14} -> {pair[1]:<14} "
                  f"retained {base['retained'] / 2**20:7.1f} -> {fused['retained'] / 2**20:7.1f} MiB "
                  f"({save_r:+.0%} saved), peak {base['peak'] / 2**20:7.1f} -> {fused['peak'] / 2**20:7.1f} MiB "
                  f"({save_p:+.0%} saved)")
    return rows


def speed_report(shape=(32, 64, 56, 56), rounds: int = 20, torch=None) -> dict:
    """Best times of the fused ops against their unfused sequences (NumPy-level ops, and PyTorch's
    when ``torch`` is given), rounds interleaved (`bnfast._bench._time_interleaved`), printed."""
    from ._bench import _time_interleaved  # noqa: PLC0415

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    z = rng.standard_normal(shape).astype(np.float32)
    C = shape[1]
    w, b = np.ones(C, np.float32), np.zeros(C, np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y = np.empty_like(x)
    cases = {
        "fused forward act(BN(x)+z)": lambda: bnfast.batch_norm_act_forward(
            x, w, b, rm, rv, residual=z, out=y),
        "unfused forward BN, +z, relu (NumPy ops)": lambda: np.maximum(
            np.add(bnfast.batch_norm_forward(x, w, b, rm, rv, out=y)[0], z, out=y), 0, out=y),
        "fused inference": lambda: bnfast.batch_norm_act_inference(x, rm, rv, w, b, residual=z, out=y),
        "unfused inference (NumPy ops)": lambda: np.maximum(
            np.add(bnfast.batch_norm_inference(x, rm, rv, w, b, out=y), z, out=y), 0, out=y),
    }
    if torch is not None:
        F = torch.nn.functional
        tx, tz = torch.from_numpy(x), torch.from_numpy(z)
        tw, tb, trm, trv = (torch.from_numpy(a.copy()) for a in (w, b, rm, rv))
        cases["torch forward relu(bn(x)+z)"] = lambda: F.relu(
            F.batch_norm(tx, trm, trv, tw, tb, training=True) + tz)
        cases["torch inference relu(bn(x)+z)"] = lambda: F.relu(
            F.batch_norm(tx, trm, trv, tw, tb, training=False) + tz)
    results = _time_interleaved(cases, rounds, 0.0, torch)
    for name, t in results.items():
        print(f"{name:45s} {t * 1e3:9.3f} ms")
    f, u = results["fused forward act(BN(x)+z)"], results["unfused forward BN, +z, relu (NumPy ops)"]
    print(f"forward: unfused / fused = {u / f:.2f}x")
    fi, ui = results["fused inference"], results["unfused inference (NumPy ops)"]
    print(f"inference: unfused / fused = {ui / fi:.2f}x")
    if torch is not None:
        print(f"forward: torch / fused = {results['torch forward relu(bn(x)+z)'] / f:.2f}x; "
              f"inference: torch / fused = {results['torch inference relu(bn(x)+z)'] / fi:.2f}x")
    return results


def main_fused(args: argparse.Namespace, threads: list[int], shapes) -> int:
    """``--fused``: the speed table per thread count and shape, then the memory table."""
    import json  # noqa: PLC0415

    from ._bench import _torch, header_lines, machine_info  # noqa: PLC0415

    torch = None if args.no_torch else _torch()
    print("bnfast bench --fused")
    for line in header_lines(torch):
        print("  " + line)
    before = bnfast.get_num_threads()
    results = []
    try:
        for t in threads:
            bnfast.set_num_threads(t)
            if torch is not None:
                torch.set_num_threads(t)
            for shape in shapes or [(32, 64, 56, 56)]:
                print(f"-- {'x'.join(map(str, shape))} float32 NCHW, {t} thread(s), best of {args.rounds * 5} "
                      "interleaved rounds")
                times = speed_report(tuple(shape), rounds=args.rounds * 5, torch=torch)
                results.append({"shape": list(shape), "threads": t, "seconds": times})
    finally:
        bnfast.set_num_threads(before)
    print("-- memory of a training step (tracemalloc)")
    memory = memory_report((2, 4, 8, 8) if args.quick else (16, 32, 32, 32))
    if args.json:
        meta = dict(machine_info(), numpy=np.__version__, torch=torch.__version__ if torch is not None else None)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "speed": results, "memory": memory}, f, indent=1)
        print(f"raw figures written to {args.json}")
    return 0
