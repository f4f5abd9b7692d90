"""Fused batch norm + residual add + activation: memory of a training step and speed.

Memory (tracemalloc, NumPy's allocations): one training step (forward, MSE
loss, backward, SGD step) of Conv-BN-act x 4, measured as the bytes the
forward leaves alive for backward ("retained") and the step's peak above the
memory held before it ("peak"), for

* Conv-BN-LeakyReLU unfused (three layers) vs fused in place
  (``BatchNorm2d(..., activation="leaky_relu", inplace=True)``, InPlace-ABN),
* Conv-BN-ReLU unfused vs fused (``Sequential`` fuses BN + ReLU; not in
  place: ReLU is not invertible).

Speed: ``act(BN(x) + z)`` as one fused call vs batch norm, add and ReLU as
three NumPy-level operations, and vs PyTorch's unfused sequence (if torch is
installed), forward (training) and inference; median of repeats.

Run::

    python benchmarks/fused.py --memory
    python benchmarks/fused.py --speed [--shape 32,64,56,56] [--repeat 20]

(timings need a quiet machine; ``--shape 2,4,8,8 --repeat 2`` checks the
script runs.)
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import tracemalloc

import numpy as np

import bnfast
from bnfast import nn


def _stack(kind: str, channels: int, kernel: int, axis: int) -> nn.Sequential:
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


def _median_time(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed_report(shape=(32, 64, 56, 56), repeat: int = 20) -> dict:
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
    try:
        import torch

        F = torch.nn.functional
        tx, tz = torch.from_numpy(x), torch.from_numpy(z)
        tw, tb, trm, trv = (torch.from_numpy(a.copy()) for a in (w, b, rm, rv))
        with torch.no_grad():
            cases["torch forward relu(bn(x)+z)"] = lambda: F.relu(
                F.batch_norm(tx, trm, trv, tw, tb, training=True) + tz)
            cases["torch inference relu(bn(x)+z)"] = lambda: F.relu(
                F.batch_norm(tx, trm, trv, tw, tb, training=False) + tz)
        torch_ok = True
    except ImportError:
        torch_ok = False
    results = {}
    for name, fn in cases.items():
        if name.startswith("torch"):
            import torch

            with torch.no_grad():
                results[name] = _median_time(fn, repeat)
        else:
            results[name] = _median_time(fn, repeat)
        print(f"{name:45s} {results[name] * 1e3:9.3f} ms")
    f, u = results["fused forward act(BN(x)+z)"], results["unfused forward BN, +z, relu (NumPy ops)"]
    print(f"forward: unfused / fused = {u / f:.2f}x")
    fi, ui = results["fused inference"], results["unfused inference (NumPy ops)"]
    print(f"inference: unfused / fused = {ui / fi:.2f}x")
    if torch_ok:
        print(f"forward: torch / fused = {results['torch forward relu(bn(x)+z)'] / f:.2f}x; "
              f"inference: torch / fused = {results['torch inference relu(bn(x)+z)'] / fi:.2f}x")
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--memory", action="store_true", help="peak memory of a training step (tracemalloc)")
    p.add_argument("--speed", action="store_true", help="fused vs unfused timings")
    p.add_argument("--shape", default=None, help="N,C,H,W (default 16,32,32,32 memory; 32,64,56,56 speed)")
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(",")) if args.shape else None
    if args.memory or not args.speed:
        memory_report(shape or (16, 32, 32, 32))
    if args.speed:
        speed_report(shape or (32, 64, 56, 56), args.repeat)


if __name__ == "__main__":
    main()
