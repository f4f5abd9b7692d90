"""Checks of bnfast's distributed features, run by every rank under ``mpiexec -n P``.

Launched by tests/test_distributed.py (one mpiexec per rank count).  Every
rank builds the same global data from a shared seed and takes its slice, so
each can compare against single-process BatchNorm on the concatenated batch.
Each rank prints ``OK <rank> <checks>`` at the end; any failure raises
(mpiexec then exits non-zero).
"""

from __future__ import annotations

import sys

import numpy as np
from mpi4py import MPI

import bnfast
from bnfast import BatchNorm, SyncBatchNorm, nn
from bnfast.distributed import allreduce_moments

comm = MPI.COMM_WORLD
rank, P = comm.Get_rank(), comm.Get_size()
expected = int(sys.argv[1]) if len(sys.argv) > 1 else P
assert P == expected, f"launched {expected} ranks but this rank sees a world of {P}: mpiexec and mpi4py differ"
checks = 0


def check(cond: bool, what: str) -> None:
    global checks
    if not cond:
        raise AssertionError(f"rank {rank}: {what}")
    checks += 1


def close(a, b, tol, what):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(1.0, float(np.max(np.abs(b)))) if b.size else 1.0
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    check(a.shape == b.shape and err <= tol * scale, f"{what}: max error {err:.3g} (scale {scale:.3g}, tol {tol:g})")
    return err


def identical_everywhere(a, what):
    """The same bytes on every rank."""
    blobs = comm.allgather(np.ascontiguousarray(a).tobytes())
    check(all(b == blobs[0] for b in blobs), f"{what} differs across ranks")


def bounds(sizes):
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return int(starts[rank]), int(starts[rank + 1])


def expect_error(fn, what, kind=ValueError, text=None):
    try:
        fn()
    except kind as exc:
        check(text is None or text in str(exc), f"{what}: message {exc!r} lacks {text!r}")
    else:
        raise AssertionError(f"rank {rank}: {what}: no {kind.__name__}")


# per-rank batch sizes of the global batch: uneven, with a rank of 1 and (P >= 3) of 0 samples
SPLITS = {2: [[1, 6], [4, 3]], 3: [[0, 1, 6], [3, 2, 4]], 4: [[0, 1, 6, 2], [2, 2, 2, 2]]}[P]
max_err = {np.float64: 0.0, np.float32: 0.0}

# ---------------------------------------------------------------- allreduce_moments
rng = np.random.default_rng(0)
for sizes in SPLITS:
    data = 1e3 + rng.standard_normal((sum(sizes), 5, 3))
    lo, hi = bounds(sizes)
    total = allreduce_moments(bnfast.moments(data[lo:hi]), comm)
    whole = bnfast.moments(data)
    check(np.array_equal(total.count, whole.count), "allreduce_moments count")
    close(total.mean, whole.mean, 1e-14, "allreduce_moments mean")
    close(total.var(ddof=1), data.var(axis=(0, 2), ddof=1), 1e-11, "allreduce_moments var")
    for a in (total.count, total.mean, total.m2):
        identical_everywhere(a, "allreduce_moments result")
check(len(allreduce_moments(bnfast.Moments.zeros(0), comm)) == 0, "zero channels")

# ---------------------------------------------------------------- SyncBatchNorm vs BatchNorm on the whole batch
for dtype in (np.float64, np.float32):
    tol = 1e-12 if dtype == np.float64 else 2e-5
    for axis, tail in ((1, (4, 3)), (-1, (3, 4)), (1, ())):
        C = 4
        for sizes in SPLITS:
            for momentum in (0.1, None):
                n = sum(sizes)
                shape = (n, C) + tail if axis == 1 else (n,) + tail + (C,)
                x = (50.0 + 3.0 * rng.standard_normal(shape)).astype(dtype)
                g = rng.standard_normal(shape).astype(dtype)
                w = (1.0 + rng.random(C)).astype(dtype)
                b = rng.standard_normal(C).astype(dtype)
                ref = BatchNorm(C, momentum=momentum, axis=axis, dtype=dtype)
                sbn = SyncBatchNorm(C, momentum=momentum, axis=axis, dtype=dtype, comm=comm)
                for layer in (ref, sbn):
                    layer.weight[...] = w
                    layer.bias[...] = b
                lo, hi = bounds(sizes)
                for step in range(2):  # two steps: the running statistics compound
                    xs = x + step
                    y_ref = ref(xs)
                    gx_ref = ref.backward(g)
                    y = sbn(xs[lo:hi])
                    gx = sbn.backward(g[lo:hi])
                    what = f"{np.dtype(dtype).name} axis={axis} shape={shape} sizes={sizes} step {step}"
                    e1 = close(y, y_ref[lo:hi], tol, f"output {what}")
                    e2 = close(gx, gx_ref[lo:hi], tol, f"grad_input {what}")
                    gw = np.sum(comm.allgather(sbn.weight.grad.astype(np.float64)), axis=0)
                    gb = np.sum(comm.allgather(sbn.bias.grad.astype(np.float64)), axis=0)
                    e3 = close(gw, ref.weight.grad, tol, f"summed grad_weight {what}")
                    e4 = close(gb, ref.bias.grad, tol, f"summed grad_bias {what}")
                    e5 = close(sbn.running_mean, ref.running_mean, tol, f"running_mean {what}")
                    e6 = close(sbn.running_var, ref.running_var, tol, f"running_var {what}")
                    check(int(sbn.num_batches_tracked) == int(ref.num_batches_tracked), "num_batches_tracked")
                    check(y.dtype == dtype and gx.dtype == dtype and y.shape == xs[lo:hi].shape, "dtype/shape")
                    max_err[dtype] = max(max_err[dtype], e1, e2, e3, e4, e5, e6)
                    identical_everywhere(sbn.running_mean, "running_mean")
                    identical_everywhere(sbn.running_var, "running_var")

# float32 at a large offset: the global statistics are exact, the output as accurate as BatchNorm's
C = 3
x64 = 1e4 + rng.standard_normal((12, C, 6))
x32 = x64.astype(np.float32)
sizes = SPLITS[0]
sizes = [s * 12 // sum(sizes) for s in sizes]
sizes[-1] += 12 - sum(sizes)
lo, hi = bounds(sizes)
sbn = SyncBatchNorm(C, comm=comm)
y = sbn(x32[lo:hi])
exact = x32.astype(np.float64)
exact = (exact - exact.mean(axis=(0, 2), keepdims=True)) / np.sqrt(exact.var(axis=(0, 2), keepdims=True) + 1e-5)
close(y, exact[lo:hi], 2e-6, "float32 output at offset 1e4 against float64")

# eval mode: plain inference, no communication (rank 0 alone; a collective would hang)
sbn.eval()
if rank == 0:
    y_eval = sbn(x32)
    ref = BatchNorm(C)
    ref.load_state_dict(sbn.state_dict())
    ref.eval()
    check(np.array_equal(y_eval, ref(x32)), "eval mode equals BatchNorm inference")
    check(list(sbn.state_dict()) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"],
          "state_dict keys")
comm.Barrier()

# ---------------------------------------------------------------- errors: on every rank, nothing changed


def layer_state(layer):
    return [a.copy() for a in (layer.running_mean, layer.running_var, layer.num_batches_tracked)]


def same_state(layer, before, what):
    check(all(np.array_equal(a, b) for a, b in zip(layer_state(layer), before)), f"{what}: state changed")


C = 3
sbn = SyncBatchNorm(C, comm=comm, dtype=np.float64)
good = rng.standard_normal((4, C, 2))
sbn(good)
sbn.backward(np.ones_like(good))
gw_before = sbn.weight.grad.copy()
saved_before = sbn._saved
before = layer_state(sbn)
bad_rank = P - 1

# a rank whose input has the wrong channel count: its own ValueError, a ValueError naming it elsewhere
x_bad = np.ones((4, C + 1, 2)) if rank == bad_rank else good  # (no rank-dependent draws from rng)
expect_error(lambda: sbn(x_bad), "wrong channels on one rank", ValueError,
             "channels" if rank == bad_rank else f"rank(s) [{bad_rank}]")
same_state(sbn, before, "wrong channels")
check(sbn._saved is saved_before, "saved values kept")
# a rank whose input has the wrong dtype: TypeError there
x_bad = good.astype(np.float32) if rank == bad_rank else good
expect_error(lambda: sbn(x_bad), "wrong dtype on one rank", TypeError if rank == bad_rank else ValueError)
same_state(sbn, before, "wrong dtype")
x_bad = good.astype(np.int64) if rank == bad_rank else good
expect_error(lambda: sbn(x_bad), "integer input on one rank", TypeError if rank == bad_rank else ValueError)
same_state(sbn, before, "integer input")
# a bad eps on one rank
sbn.eps = -1.0 if rank == bad_rank else 1e-5
expect_error(lambda: sbn(good), "bad eps on one rank")
sbn.eps = 1e-5
same_state(sbn, before, "bad eps")
# layers with different channel counts on different ranks (each input matching its layer)
odd = SyncBatchNorm(C + rank, comm=comm)
expect_error(lambda: odd(np.ones((3, C + rank), np.float32)), "inconsistent channel counts", ValueError,
             "inconsistent channel counts")
check(int(odd.num_batches_tracked) == 0, "inconsistent channels: counter unchanged")
# layers of different dtypes on different ranks
dt = np.float64 if rank == 0 else np.float32
odd = SyncBatchNorm(C, comm=comm, dtype=dt)
expect_error(lambda: odd(np.ones((3, C), dt)), "inconsistent dtypes", ValueError, "inconsistent dtypes")
check(int(odd.num_batches_tracked) == 0, "inconsistent dtypes: counter unchanged")
# a global batch of one value per channel: rank 0 holds one sample, the others none
one = np.ones((1 if rank == 0 else 0, C))
flat = SyncBatchNorm(C, comm=comm, dtype=np.float64)
expect_error(lambda: flat(one), "one value per channel", ValueError, "more than 1 value per channel")
check(np.array_equal(flat.running_var, np.ones(C)) and int(flat.num_batches_tracked) == 0, "one value: unchanged")
# an empty global batch
expect_error(lambda: flat(np.zeros((0, C))), "empty global batch", ValueError, "more than 1 value per channel")
# backward with a wrong grad_out shape on one rank: nothing changes anywhere
g_bad = np.ones((5, C, 2)) if rank == bad_rank else np.ones_like(good)
expect_error(lambda: sbn.backward(g_bad), "bad grad_out on one rank", ValueError,
             "grad_out has shape" if rank == bad_rank else f"rank(s) [{bad_rank}]")
check(np.array_equal(sbn.weight.grad, gw_before), "bad grad_out: gradients unchanged")
# allreduce_moments with something else than Moments on one rank
arg = "not moments" if rank == bad_rank else bnfast.moments(good)
expect_error(lambda: allreduce_moments(arg, comm), "allreduce_moments bad argument",
             TypeError if rank == bad_rank else ValueError)
# allreduce_moments with different channel counts
expect_error(lambda: allreduce_moments(bnfast.Moments.zeros(2 + rank), comm), "allreduce_moments channels",
             ValueError, "inconsistent channel counts")
# after all of that the ranks are still in step: a good collective gives the right answer
y = sbn(good)
ref = BatchNorm(C, dtype=np.float64)
ref.running_mean[...], ref.running_var[...] = before[0], before[1]
ref.num_batches_tracked[...] = before[2]
y_ref = ref(np.concatenate(comm.allgather(good)))
close(y, y_ref[rank * 4:(rank + 1) * 4], 1e-12, "step after the errors")
close(sbn.running_var, ref.running_var, 1e-12, "running_var after the errors")

# ---------------------------------------------------------------- convert_sync_batchnorm


def small_model(seed, dtype=np.float64):
    return nn.Sequential(nn.Linear(6, 8, rng=seed, dtype=dtype), nn.BatchNorm1d(8, dtype=dtype), nn.ReLU(),
                         nn.Linear(8, 3, rng=seed + 1, dtype=dtype))


model = small_model(0)
opt = nn.SGD(model.parameters(), lr=0.1)
bn_before = model[1]
bn_before.running_mean[...] = 0.5
converted = SyncBatchNorm.convert_sync_batchnorm(model, comm)
check(converted is model and isinstance(model[1], SyncBatchNorm), "converted in place")
check(model[1].weight is bn_before.weight and model[1].running_mean is bn_before.running_mean,
      "parameters and buffers carried over")
check(model[1].dtype == np.float64 and model[1].comm is comm, "settings carried over")
check(all(p is q for p, q in zip(model.parameters(), opt.parameters())), "optimizer still updates the model")
lst = SyncBatchNorm.convert_sync_batchnorm([nn.BatchNorm2d(4), nn.ReLU()], comm)
check(isinstance(lst, list) and isinstance(lst[0], SyncBatchNorm) and isinstance(lst[1], nn.ReLU), "list")

# ---------------------------------------------------------------- recalibrate with comm
all_batches = [3.0 * k + rng.standard_normal((5 + k, 6)) for k in range(5)]
holders = P - 1 if P >= 3 else P  # with P >= 3 the last rank has no batch
mine = [bt for i, bt in enumerate(all_batches) if i % holders == rank]
ranks_batches = comm.allgather(len(mine))
local_model, whole_model = small_model(5), small_model(5)
bnfast.recalibrate(local_model, mine, comm=comm)
used = [bt for r in range(P) for bt in comm.bcast(mine, root=r)]
bnfast.recalibrate(whole_model, used)
close(local_model[1].running_mean, whole_model[1].running_mean, 1e-12, "recalibrate mean")
close(local_model[1].running_var, whole_model[1].running_var, 1e-12, "recalibrate var")
check(int(local_model[1].num_batches_tracked) == len(all_batches) == sum(ranks_batches), "recalibrate count")
identical_everywhere(local_model[1].running_var, "recalibrate var")
# a single layer too, and the error of a rank whose data are bad
layer = BatchNorm(6, dtype=np.float64)
bnfast.recalibrate(layer, [bt[:, :, None] for bt in mine], comm=comm)
close(layer.running_var, np.concatenate(used).var(axis=0, ddof=1), 1e-11, "recalibrate single layer")
bad = [np.ones((3, 7))] if rank == bad_rank else mine
before = [local_model[1].running_mean.copy(), local_model[1].running_var.copy()]
expect_error(lambda: bnfast.recalibrate(local_model, bad, comm=comm), "recalibrate with bad data on one rank",
             Exception if rank == bad_rank else ValueError)
check(np.array_equal(local_model[1].running_var, before[1]), "recalibrate failure: unchanged")
expect_error(lambda: bnfast.recalibrate(small_model(0), [], comm=comm), "recalibrate without data",
             ValueError, "received no batch")

# ---------------------------------------------------------------- fit: P ranks x batch b == 1 process x batch P*b
X = rng.standard_normal((62, 6))  # tails of 6 (P=2), 2 (P=3: a rank of 0) and 14 (P=4)
labels = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 1).astype(np.int64)
Xv, yv = X[:17] + 0.1, labels[:17]
b = 4
for drop_last in (False, True):
    dist_model = SyncBatchNorm.convert_sync_batchnorm(small_model(rank + 10), comm)  # rank 0's weights win
    single = small_model(10)
    hists = []
    for m, c, bs in ((dist_model, comm, b), (single, None, b * P)):
        opt = nn.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        hists.append(nn.fit(m, nn.CrossEntropyLoss(), opt, X, labels, epochs=3, batch_size=bs, seed=7,
                            progress=False, validation_data=(Xv, yv), drop_last=drop_last, comm=c,
                            scheduler=nn.StepLR(opt, 2, 0.5)))
    for (name, p), q in zip(dist_model.named_parameters(), single.parameters()):
        close(p, q, 1e-10, f"fit drop_last={drop_last}: parameter {name}")
        identical_everywhere(p, f"fit parameter {name}")
    close(dist_model[1].running_var, single[1].running_var, 1e-10, "fit running_var")
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        close(hists[0][key], hists[1][key], 1e-10, f"fit history {key}")
# float32 model: close, not exact
dist_model = SyncBatchNorm.convert_sync_batchnorm(small_model(3, np.float32), comm)
single = small_model(3, np.float32)
for m, c, bs in ((dist_model, comm, b), (single, None, b * P)):
    nn.fit(m, nn.CrossEntropyLoss(), nn.SGD(m.parameters(), lr=0.1), X.astype(np.float32), labels, epochs=2,
           batch_size=bs, seed=1, progress=False, comm=c)
for p, q in zip(dist_model.parameters(), single.parameters()):
    close(p, q, 1e-4, "fit float32")
# ranks that disagree on the data raise everywhere instead of hanging
expect_error(lambda: nn.fit(small_model(0), nn.CrossEntropyLoss(), nn.SGD(small_model(0).parameters(), lr=0.1),
                            X[:40 + rank], labels[:40 + rank], epochs=1, batch_size=4, progress=False, comm=comm),
             "fit with different data sizes", ValueError, "disagree")
X_odd = X + (rank == bad_rank)
expect_error(lambda: nn.fit(small_model(0), nn.CrossEntropyLoss(), nn.SGD(small_model(0).parameters(), lr=0.1),
                            X_odd, labels, epochs=1, batch_size=4, progress=False, comm=comm),
             "fit with different data", ValueError, "disagree")

all_max = comm.allreduce(max_err[np.float64], op=MPI.MAX), comm.allreduce(max_err[np.float32], op=MPI.MAX)
if rank == 0:
    print(f"max |SyncBatchNorm - BatchNorm| over outputs, grads, running stats at {P} ranks: "
          f"float64 {all_max[0]:.3g}, float32 {all_max[1]:.3g} (relative to max(1, |reference|))", flush=True)
print(f"OK {rank} {checks}", flush=True)
