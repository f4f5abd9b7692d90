"""``python -m bnfast demo --norms``: the demo CNN with each normalization at batch sizes 2, 8 and 32.

Every run starts from the same convolution and linear weights (one seed) and
sees the same mini-batches; only the normalization layer after each
convolution and the batch size change.  The learning rate follows the
linear scaling rule (``lr * batch / 32``).  The table shows where batch
normalization degrades at tiny batches (noisy statistics in training,
running statistics that do not match them in evaluation) and which variants
recover it.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from . import _cli, _demo

__all__ = ["NORMS", "build_model", "main", "run"]

BATCH_SIZES = (2, 8, 32)
DEFAULT_EPOCHS = 3
QUICK_SAMPLES = 240


def _norm_factories(steps_per_epoch: int, batch_size: int) -> dict[str, Callable[[int, tuple[int, ...]], Any]]:
    """name -> ``make(channels, spatial)``; ``spatial`` is () for the hidden linear layer's features."""
    import bnfast
    from . import nn

    ghost = max(2, batch_size // 4)
    burn_in = max(1, steps_per_epoch // 2)

    def pick(two_d: Any, one_d: Any) -> Callable[[int, tuple[int, ...]], Any]:
        return lambda c, hw: (two_d if hw else one_d)(c, hw)

    return {
        "BatchNorm": pick(lambda c, hw: nn.BatchNorm2d(c), lambda c, hw: nn.BatchNorm1d(c)),
        "Ghost BN": pick(lambda c, hw: nn.BatchNorm2d(c, virtual_batch_size=ghost),
                         lambda c, hw: nn.BatchNorm1d(c, virtual_batch_size=ghost)),
        "Batch Renorm": pick(lambda c, hw: bnfast.BatchRenorm2d(c, momentum=0.1),
                             lambda c, hw: bnfast.BatchRenorm1d(c, momentum=0.1)),
        "Cross-iter BN": pick(lambda c, hw: bnfast.CrossIterationBatchNorm2d(c, burn_in=burn_in),
                              lambda c, hw: bnfast.CrossIterationBatchNorm1d(c, burn_in=burn_in)),
        "GroupNorm": lambda c, hw: nn.GroupNorm(4, c),
        "LayerNorm": lambda c, hw: nn.LayerNorm((c,) + hw),
        "none": lambda c, hw: None,
    }


class _RenormWarmup:
    """The epoch scheduler, plus Batch Renorm's warm-up (Ioffe 2017): r_max 1 and d_max 0 in the first
    epoch (batch normalization), relaxed linearly to 3 and 5 over the first half of the epochs."""

    def __init__(self, scheduler: Any, model: Any, epochs: int) -> None:
        import bnfast

        self.scheduler, self.epoch, self.ramp = scheduler, 0, max(1, epochs // 2)
        self.layers = [m for m in model.modules() if isinstance(m, bnfast.nn.variants._BatchRenorm)]
        self._set()

    def _set(self) -> None:
        t = min(1.0, self.epoch / self.ramp)
        for layer in self.layers:
            layer.r_max, layer.d_max = 1.0 + 2.0 * t, 5.0 * t

    def step(self) -> None:
        self.scheduler.step()
        self.epoch += 1
        self._set()


NORMS = ("BatchNorm", "Ghost BN", "Batch Renorm", "Cross-iter BN", "GroupNorm", "LayerNorm", "none")


def build_model(norm: Callable[[int, tuple[int, ...]], Any], seed: int = _demo.DEFAULT_SEED) -> Any:
    """The demo CNN, with a hidden linear layer, and ``norm`` after each convolution and that layer.

    (Conv3x3 - norm - ReLU - MaxPool2) x 2, then Linear(128, 64) - norm - ReLU -
    Linear(64, 10).  The hidden layer's normalization sees one value per
    sample and channel: at batch size 2, two values -- where batch
    statistics are noisiest.

    Parameters
    ----------
    norm : callable
        ``norm(channels, spatial)`` makes the normalization layer (or None)
        for a convolution's output (spatial ``(h, w)``) or the hidden
        features (``()``).
    seed : int
        Seed of the convolution and linear weights (drawn as in
        :func:`bnfast._demo.build_model`).

    Returns
    -------
    bnfast.nn.Sequential
        ``(N, 1, 8, 8)`` to ``(N, 10)`` logits.
    """
    from . import nn

    rng = np.random.default_rng(seed)
    conv1 = nn.Conv2d(1, 16, 3, padding=1, rng=rng)
    conv2 = nn.Conv2d(16, 32, 3, padding=1, rng=rng)
    hidden = nn.Linear(32 * 2 * 2, 64, rng=rng)
    layers: list[Any] = [conv1]
    first, second, third = norm(16, (8, 8)), norm(32, (4, 4)), norm(64, ())
    layers += [first] if first is not None else []
    layers += [nn.ReLU(), nn.MaxPool2d(2), conv2]
    layers += [second] if second is not None else []
    layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), hidden]
    layers += [third] if third is not None else []
    fc = nn.Linear(64, 10, rng=rng)
    layers += [nn.ReLU(), fc]
    return nn.Sequential(*layers)


def run(name: str, data: tuple[np.ndarray, ...], *, batch_size: int, epochs: int, lr: float,
        seed: int) -> float:
    """Train one model and return its final test accuracy.

    Parameters
    ----------
    name : str
        One of :data:`NORMS`.
    data : tuple
        ``(X_train, y_train, X_test, y_test)``.
    batch_size, epochs : int
    lr : float
        Learning rate at batch size 32 (scaled linearly).
    seed : int

    Returns
    -------
    float
        Test accuracy after the last epoch (eval mode).
    """
    from . import nn

    X_train, y_train, X_test, y_test = data
    steps = len(X_train) // batch_size
    model = build_model(_norm_factories(steps, batch_size)[name], seed)
    rate = lr * batch_size / 32
    opt = nn.SGD(model.parameters(), lr=rate, momentum=_demo.MOMENTUM, weight_decay=_demo.WEIGHT_DECAY)
    sched = _RenormWarmup(nn.CosineAnnealingLR(opt, T_max=epochs), model, epochs)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"), _demo._one_blas_thread():
        hist = nn.fit(model, nn.CrossEntropyLoss(), opt, X_train, y_train, epochs=epochs, batch_size=batch_size,
                      validation_data=(X_test, y_test), scheduler=sched, progress=False, seed=seed,
                      drop_last=True)
    return float(hist["val_accuracy"][-1])


def _table(acc: dict[str, dict[int, float]], sizes: Sequence[int]) -> str:
    head = ["normalization"] + [f"batch {b}" for b in sizes]
    rows = [[name] + [f"{acc[name][b]:.2%}" for b in sizes] for name in acc]
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def _plot(path: str, acc: dict[str, dict[int, float]], sizes: Sequence[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(acc)
    for i, (name, per) in enumerate(acc.items()):
        ax.bar(np.arange(len(sizes)) + i * width, [per[b] * 100 for b in sizes], width, label=name)
    ax.set_xticks(np.arange(len(sizes)) + 0.4 - width / 2, [f"batch {b}" for b in sizes])
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("bnfast demo: digits CNN, normalization vs batch size")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bnfast demo --norms",
        description="Train the demo CNN with each normalization at batch sizes 2, 8 and 32 and print the test "
                    "accuracies.",
        epilog=_cli.EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--norms", action="store_true", help="(this comparison)")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"epochs per run (default {DEFAULT_EPOCHS})")
    p.add_argument("--seed", type=int, default=_demo.DEFAULT_SEED, help="seed of split, weights and shuffling")
    p.add_argument("--lr", type=float, default=_demo.DEFAULT_LR, help="learning rate at batch 32 (scaled linearly)")
    p.add_argument("--quick", action="store_true",
                   help=f"CI smoke run: {QUICK_SAMPLES} training images, one epoch")
    p.add_argument("--plot", metavar="FILE.png", help="save a bar chart of the table (needs matplotlib)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison.

    Parameters
    ----------
    argv : list of str, optional
        The demo's arguments (``--norms``, ``--epochs``, ``--seed``, ``--lr``,
        ``--quick``, ``--plot FILE.png``).

    Returns
    -------
    int
        0 on success, 2 on bad arguments or a missing optional dependency.
    """
    try:
        args = _parser().parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.epochs < 1 or not args.lr > 0:
        print("error: --epochs must be >= 1 and --lr > 0", file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: --plot needs matplotlib, which is not installed: pip install matplotlib", file=sys.stderr)
            return 2
    try:
        data = _demo.load_data(args.seed)
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    epochs = 1 if args.quick else args.epochs
    if args.quick:
        data = (data[0][:QUICK_SAMPLES], data[1][:QUICK_SAMPLES]) + tuple(data[2:])
    print(f"digits: {len(data[0])} training / {len(data[2])} test images; SGD lr={args.lr:g}*batch/32 (cosine), "
          f"{epochs} epoch(s), seed {args.seed}")
    acc: dict[str, dict[int, float]] = {name: {} for name in NORMS}
    t0 = time.perf_counter()
    for b in BATCH_SIZES:
        for name in NORMS:
            acc[name][b] = run(name, data, batch_size=b, epochs=epochs, lr=args.lr, seed=args.seed)
        print(f"  batch {b:>2}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    print()
    print(_table(acc, BATCH_SIZES))
    if args.plot:
        _plot(args.plot, acc, BATCH_SIZES)
        print(f"chart saved to {args.plot}")
    return 0
