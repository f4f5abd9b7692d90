"""``python -m bnfast demo``: a small CNN on scikit-learn's digits, with and without batch normalization.

Both runs start from the same initial weights (the convolution and linear
layers are drawn from the same seed; the BatchNorm layers start at weight 1,
bias 0) and see the same mini-batches in the same order, so the only
difference is the normalization.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from typing import Any, Sequence

import numpy as np

from . import _cli

__all__ = ["main", "build_model", "load_data", "run"]

DEFAULT_EPOCHS = 12
DEFAULT_LR = 0.2
WEIGHT_DECAY = 5e-4
MOMENTUM = 0.9
DEFAULT_BATCH = 32
DEFAULT_SEED = 0
TARGET = 0.95


def load_data(seed: int = DEFAULT_SEED, dtype: Any = np.float32) -> tuple[np.ndarray, ...]:
    """Load the bundled 8x8 digits and split them 80/20, stratified.

    Parameters
    ----------
    seed : int
        Seed of the split.
    dtype : numpy dtype, default numpy.float32

    Returns
    -------
    X_train, y_train, X_test, y_test : numpy.ndarray
        Images ``(N, 1, 8, 8)`` scaled to ``[0, 1]`` and int64 labels.

    Raises
    ------
    ImportError
        When scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the demo needs scikit-learn for its bundled digits data set (no download): "
            "pip install scikit-learn"
        ) from exc
    digits = load_digits()
    X = (digits.images / 16.0).astype(dtype)[:, None, :, :]
    y = digits.target.astype(np.int64)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, stratify=y, random_state=seed)
    return X_train, y_train, X_test, y_test


def build_model(batch_norm: bool, seed: int = DEFAULT_SEED, dtype: Any = np.float32) -> Any:
    """The demo CNN: (Conv3x3 - [BN] - ReLU - MaxPool2) x 2, then Linear.

    Parameters
    ----------
    batch_norm : bool
        Insert ``BatchNorm2d`` after each convolution.
    seed : int
        Seed of the convolution and linear weights; the same seed gives the
        same weights with and without batch normalization.
    dtype : numpy dtype, default numpy.float32

    Returns
    -------
    bnfast.nn.Sequential
        Takes ``(N, 1, 8, 8)`` and returns ``(N, 10)`` logits.
    """
    from . import nn

    rng = np.random.default_rng(seed)
    conv1 = nn.Conv2d(1, 16, 3, padding=1, dtype=dtype, rng=rng)
    conv2 = nn.Conv2d(16, 32, 3, padding=1, dtype=dtype, rng=rng)
    fc = nn.Linear(32 * 2 * 2, 10, dtype=dtype, rng=rng)
    layers: list[Any] = [conv1]
    if batch_norm:
        layers.append(nn.BatchNorm2d(16, dtype=dtype))
    layers += [nn.ReLU(), nn.MaxPool2d(2), conv2]
    if batch_norm:
        layers.append(nn.BatchNorm2d(32, dtype=dtype))
    layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), fc]
    return nn.Sequential(*layers)


def run(batch_norm: bool, data: tuple[np.ndarray, ...], *, epochs: int, lr: float, batch_size: int,
        seed: int, progress: bool = False, comm: Any = None) -> dict[str, list[float]]:
    """Train one model and return its ``fit`` history (validated on the test split).

    SGD with momentum 0.9 and weight decay 5e-4, learning rate annealed from
    ``lr`` to 0 by :class:`~bnfast.nn.CosineAnnealingLR` over ``epochs``.

    Parameters
    ----------
    batch_norm : bool
    data : tuple
        As returned by :func:`load_data`.
    epochs : int
    lr : float
        Initial learning rate.
    batch_size : int
    seed : int
        Seed of the weights and of the shuffling.
    progress : bool, default False
    comm : mpi4py.MPI.Comm, optional
        Train data-parallel over its ranks: the BatchNorm layers become
        :class:`~bnfast.SyncBatchNorm` and each rank takes ``batch_size /
        ranks`` samples of every batch (rounded up).

    Returns
    -------
    dict of str to list of float
        The history returned by :func:`bnfast.nn.fit`.
    """
    from . import nn

    X_train, y_train, X_test, y_test = data
    model = build_model(batch_norm, seed)
    if comm is not None:
        from .nn.normalization import SyncBatchNorm

        model = SyncBatchNorm.convert_sync_batchnorm(model, comm)
        batch_size = -(-batch_size // comm.Get_size())
    opt = nn.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    sched = nn.CosineAnnealingLR(opt, T_max=epochs)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"), _one_blas_thread():
        return nn.fit(model, nn.CrossEntropyLoss(), opt, X_train, y_train, epochs=epochs,
                      batch_size=batch_size, validation_data=(X_test, y_test), scheduler=sched,
                      progress=progress, seed=seed, comm=comm,
                      drop_last=len(X_train) % (batch_size * (comm.Get_size() if comm else 1)) == 1)


def _mpi_comm() -> Any:
    """``MPI.COMM_WORLD`` when launched by ``mpiexec -n P`` with P > 1, else None.

    The launcher is recognized by the world size it exports (``PMI_SIZE``:
    MPICH and Intel MPI; ``OMPI_COMM_WORLD_SIZE``: Open MPI).
    """
    import os

    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(var, "1").strip().isdigit() and int(os.environ.get(var, "1")) > 1:
            from .distributed import get_comm

            return get_comm()
    return None


def _one_blas_thread() -> Any:
    """Limit BLAS to one thread when threadpoolctl is available.

    The matrices of this tiny network are too small to gain from BLAS threads,
    and on a busy machine spinning BLAS threads make epochs several times
    slower; batch normalization keeps bnfast's own thread setting.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _epochs_to(hist: dict[str, list[float]], target: float) -> str:
    for i, acc in enumerate(hist["val_accuracy"]):
        if acc >= target:
            return str(i + 1)
    return "never"


def _table(results: list[tuple[str, dict[str, list[float]]]]) -> str:
    head = ("model", "test acc", "final train loss", f"epochs to {TARGET:.0%} test acc", "s/epoch")
    rows = []
    for name, h in results:
        loss = h["loss"][-1]
        rows.append((
            name,
            f"{h['val_accuracy'][-1]:.2%}",
            f"{loss:.4f}" if math.isfinite(loss) else str(loss),
            _epochs_to(h, TARGET),
            f"{np.mean(h['seconds']):.3f}",
        ))
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]

    def fmt(row: tuple[str, ...]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    return "\n".join(lines)


def _when(epoch: str) -> str:
    return f"after {epoch} epoch(s)" if epoch != "never" else "never"


def _verdict(with_bn: dict[str, list[float]], without: dict[str, list[float]], lr: float) -> str:
    a, b = with_bn["val_accuracy"][-1], without["val_accuracy"][-1]
    ea, eb = _epochs_to(with_bn, TARGET), _epochs_to(without, TARGET)
    if not math.isfinite(without["loss"][-1]):
        return (f"At lr={lr:g} the network without batch normalization diverged (loss {without['loss'][-1]}); "
                f"with batch normalization it reached {a:.2%}.")
    diff = a - b
    parts = [f"At lr={lr:g}, batch normalization changed the final test accuracy by {diff * 100:+.2f} points "
             f"({a:.2%} vs {b:.2%})"]
    if ea != eb:
        parts.append(f"and reached {TARGET:.0%} test accuracy {_when(ea)} (without: {_when(eb)})")
    elif ea == "never":
        parts.append(f"and neither run reached {TARGET:.0%}")
    else:
        parts.append(f"and both reached {TARGET:.0%} {_when(ea)}")
    text = " ".join(parts) + "."
    if abs(diff) < 0.005 and ea == eb:
        text += " On this small problem the difference is negligible."
    return text


def _plot(path: str, results: list[tuple[str, dict[str, list[float]]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for (name, h), color in zip(results, ("tab:blue", "tab:orange")):
        ep = np.arange(1, len(h["loss"]) + 1)
        ax1.plot(ep, h["loss"], marker="o", color=color, label=f"{name} (train)")
        ax1.plot(ep, h["val_loss"], linestyle="--", color=color, label=f"{name} (test)")
        ax2.plot(ep, np.asarray(h["val_accuracy"]) * 100, marker="o", color=color, label=name)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy loss")
    ax1.set_yscale("log")
    ax1.set_title("loss")
    ax1.legend()
    ax2.axhline(TARGET * 100, color="grey", linewidth=0.8, linestyle=":")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test accuracy (%)")
    ax2.set_title("test accuracy")
    ax2.legend()
    fig.suptitle("bnfast demo: digits CNN with and without batch normalization")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bnfast demo",
        description="Train the same small CNN on scikit-learn's bundled 8x8 digits with and without "
                    "batch normalization (same initial weights, same batches) and compare.  Under "
                    "`mpiexec -n P` (P > 1) both runs are data-parallel over the P processes "
                    "(SyncBatchNorm; needs the mpi extra).",
        epilog=_cli.EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"epochs per run (default {DEFAULT_EPOCHS})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed of split, weights and shuffling (default {DEFAULT_SEED})")
    p.add_argument("--lr", type=float, default=DEFAULT_LR,
                   help=f"initial SGD learning rate, cosine-annealed to 0 (default {DEFAULT_LR})")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"mini-batch size (default {DEFAULT_BATCH})")
    p.add_argument("--plot", metavar="FILE.png", help="save loss and accuracy curves of both runs (needs matplotlib)")
    p.add_argument("--progress", action="store_true", help="show a progress bar per epoch")
    p.add_argument("--norms", action="store_true",
                   help="instead, compare BatchNorm, Ghost BN, Batch Renorm, cross-iteration BN, GroupNorm, "
                        "LayerNorm and none at batch sizes 2, 8, 32 (see --norms --help)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments after ``demo`` (``--epochs``, ``--seed``,
        ``--lr``, ``--batch-size``, ``--plot FILE.png``, ``--progress``).

    Returns
    -------
    int
        Exit status: 0 on success, 2 on bad arguments or a missing optional
        dependency.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--norms" in argv:  # the normalization comparison has its own module
        from . import _demo_norms

        return _demo_norms.main(argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on errors
        return int(exc.code or 0)
    if args.epochs < 1 or args.batch_size < 2 or not args.lr > 0:
        print("error: --epochs must be >= 1, --batch-size >= 2 and --lr > 0", file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: --plot needs matplotlib, which is not installed: pip install matplotlib", file=sys.stderr)
            return 2
    try:
        data = load_data(args.seed)
        comm = _mpi_comm()
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    lead = comm is None or comm.Get_rank() == 0
    say = print if lead else (lambda *a, **k: None)

    n_train, n_test = len(data[0]), len(data[2])
    if comm is not None:
        per_rank = -(-args.batch_size // comm.Get_size())
        say(f"data-parallel over {comm.Get_size()} processes (MPI): SyncBatchNorm, {per_rank} samples per "
            f"process and step (global batch {per_rank * comm.Get_size()})")
    say(f"digits: {n_train} training / {n_test} test images (8x8, 10 classes); "
          f"SGD lr={args.lr:g} (cosine) momentum={MOMENTUM} weight_decay={WEIGHT_DECAY:g}, batch {args.batch_size}, "
          f"{args.epochs} epochs, seed {args.seed}")
    results = []
    for name, bn in (("with BN", True), ("without BN", False)):
        t0 = time.perf_counter()
        hist = run(bn, data, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                   progress=args.progress, comm=comm)
        say(f"  trained {name:<10} in {time.perf_counter() - t0:.1f} s", flush=True)
        results.append((name, hist))
    say()
    say(_table(results))
    say()
    say(_verdict(results[0][1], results[1][1], args.lr))
    if args.plot and lead:
        _plot(args.plot, results)
        say(f"curves saved to {args.plot}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
