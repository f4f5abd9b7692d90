"""A small training loop: :func:`fit`, :func:`evaluate` and :func:`predict`."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Iterator

import numpy as np

from ._data_parallel import _Ranks, _Single
from .losses import CrossEntropyLoss

__all__ = ["fit", "evaluate", "predict"]


def _check_xy(X: Any, y: Any, who: str) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim < 1 or y.ndim < 1:
        raise ValueError(f"{who}: X and y must have a leading sample dimension")
    if len(X) != len(y):
        raise ValueError(f"{who}: X has {len(X)} samples but y has {len(y)}")
    if len(X) == 0:
        raise ValueError(f"{who}: no samples")
    return X, y


def _check_int(value: Any, minimum: int, what: str, who: str) -> int:
    """Return ``value`` as an int ``>= minimum``; ``what`` names it in the error ("batch_size must be ...")."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{who}: {what}, got {value!r}")
    return int(value)


def _check_batch_size(batch_size: Any, who: str) -> int:
    return _check_int(batch_size, 1, "batch_size must be a positive int", who)


def _n_correct(out: np.ndarray, y: np.ndarray) -> int:
    """Number of rows of logits ``out`` whose argmax is the label."""
    return int(np.count_nonzero(np.argmax(out, axis=1) == y))


@contextlib.contextmanager
def _restoring_mode(model: Any, default: bool) -> Iterator[None]:
    """Give ``model`` back the mode it had before the block, even on error.

    ``default`` is the mode assumed for a model without a ``training``
    attribute.
    """
    was_training = bool(getattr(model, "training", default))
    try:
        yield
    finally:
        model.train(was_training)


class _Progress:
    """One progress bar per epoch: tqdm when importable, a plain line otherwise."""

    def __init__(self, enabled: bool, total: int, desc: str, stream: Any = None) -> None:
        self.enabled = enabled
        self.total = total
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.count = 0
        self._bar = None
        self._last = 0.0
        self._t0 = time.perf_counter()
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm  # type: ignore[import-not-found]
        except Exception:  # tqdm missing or broken: plain fallback
            tqdm = None
        if tqdm is not None:
            self._bar = tqdm(total=total, desc=desc, file=self.stream, leave=True, unit="batch")
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, loss: float) -> None:
        self.count += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            return
        now = time.perf_counter()
        if self._tty and (now - self._last > 0.1 or self.count == self.total):
            self._last = now
            width = 20
            filled = int(width * self.count / max(self.total, 1))
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(f"\r{self.desc} [{bar}] {self.count}/{self.total} loss {loss:.4f}")
            self.stream.flush()

    def close(self, summary: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(summary, refresh=True)
            self._bar.close()
            return
        prefix = "\r" if self._tty else ""
        self.stream.write(f"{prefix}{self.desc} {self.count}/{self.total} - {summary}\n")
        self.stream.flush()


def _format(entry: dict) -> str:
    parts = [f"{entry['seconds']:.2f}s"]
    for k in ("loss", "accuracy", "val_loss", "val_accuracy"):
        if k in entry:
            parts.append(f"{k} {entry[k]:.4f}")
    parts.append(f"lr {entry['lr']:.4g}")
    return " - ".join(parts)


def fit(model: Any, loss: Any, optimizer: Any, X: Any, y: Any, *, epochs: int, batch_size: int,
        shuffle: bool = True, validation_data: tuple | None = None, scheduler: Any = None,
        progress: bool = True, seed: Any = None, drop_last: bool = False,
        comm: Any = None) -> dict[str, list[float]]:
    """Train ``model`` with mini-batches and return the per-epoch history.

    Each step runs ``out = model(xb)``, ``loss(out, yb)``,
    ``optimizer.zero_grad()``, ``model.backward(loss.backward())`` and
    ``optimizer.step()``.  The model is in training mode while it learns and
    in evaluation mode while it is validated; the mode it had before the call
    is restored at the end.  ``scheduler.step()`` runs after every epoch.

    Parameters
    ----------
    model : layer
        Any object following the layer contract (e.g. a
        :class:`~bnfast.nn.Sequential`).
    loss : CrossEntropyLoss, MSELoss or compatible
        Called as ``loss(pred, target) -> float``, then ``loss.backward()``.
    optimizer : SGD, Adam or compatible
        Has ``zero_grad()``, ``step()`` and torch-style ``param_groups``.
    X, y : array_like
        Inputs and targets with the same number of samples (first dimension).
    epochs : int
        Number of passes over the data.
    batch_size : int
        Samples per mini-batch.
    shuffle : bool, default True
        Visit the samples in a new random order every epoch.
    validation_data : (X_val, y_val), optional
        Evaluated after every epoch (``val_loss``, ``val_accuracy``).
    scheduler : StepLR, CosineAnnealingLR or compatible, optional
        Stepped once after every epoch.
    progress : bool, default True
        Show a progress bar per epoch on stderr (tqdm when installed, a plain
        fallback otherwise); ``False`` prints nothing.
    seed : int, numpy.random.Generator or None
        Seed of the shuffling.
    drop_last : bool, default False
        Skip the last batch when it is smaller than ``batch_size`` (useful
        with batch normalization when ``len(X) % batch_size == 1``).
    comm : mpi4py.MPI.Comm, optional
        Data-parallel training over the ranks of this MPI communicator
        (None, the default: this process alone).  Every rank calls ``fit``
        with the same arguments and the whole data set; ``batch_size`` is
        then the batch *per rank*, so a step sees a global batch of
        ``batch_size * comm.Get_size()`` samples.  The parameters and
        buffers are first broadcast from rank 0 (same initial weights
        everywhere); every rank draws the same permutation per epoch (the
        seed is rank 0's) and takes its share of each global batch (a short
        last batch is split as evenly as possible; a rank may get no sample).
        Each rank's loss gradient is scaled by its share of the global batch
        and the parameter gradients are summed over the ranks in one flat
        buffer (Reduce and Bcast, bit-identical everywhere), so a step is
        that of one process on the global batch -- exactly so when the model's
        batch normalization is :class:`~bnfast.SyncBatchNorm`
        (:meth:`~bnfast.SyncBatchNorm.convert_sync_batchnorm`).  Metrics are
        reduced over the ranks, validation data are split among them, and
        only rank 0 shows progress.

    Returns
    -------
    dict of str to list of float
        One entry per epoch under ``"loss"`` (mean training loss over the
        epoch's samples, measured while training), ``"accuracy"`` (for
        :class:`CrossEntropyLoss`), ``"val_loss"`` / ``"val_accuracy"`` (with
        ``validation_data``), ``"lr"`` (learning rate used during the epoch)
        and ``"seconds"`` (wall time of the training part of the epoch).

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(64, 2)).astype(np.float32)
    >>> y = (X[:, 0] > 0).astype(np.int64)
    >>> model = nn.Sequential(nn.Linear(2, 8, rng=0), nn.ReLU(), nn.Linear(8, 2, rng=1))
    >>> hist = nn.fit(model, nn.CrossEntropyLoss(), nn.SGD(model.parameters(), lr=0.5), X, y,
    ...               epochs=20, batch_size=16, progress=False, seed=0)
    >>> hist["accuracy"][-1] > 0.9
    True
    """
    X, y = _check_xy(X, y, "fit")
    batch_size = _check_batch_size(batch_size, "fit")
    epochs = _check_int(epochs, 0, "epochs must be a non-negative int", "fit")
    if validation_data is not None:
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
            raise ValueError("fit: validation_data must be a pair (X_val, y_val)")
        Xv, yv = _check_xy(validation_data[0], validation_data[1], "fit (validation_data)")
    classification = isinstance(loss, CrossEntropyLoss)
    n = len(X)
    dp: Any = _Single() if comm is None else _Ranks(
        comm, model, optimizer, X, y,
        (n, epochs, batch_size, bool(drop_last), bool(shuffle), None if validation_data is None else len(Xv)))
    rng = np.random.default_rng(dp.seed(seed))
    params = _params(optimizer) if comm is not None else []
    per_sample_mean = getattr(loss, "reduction", "mean") != "sum"
    step = batch_size * dp.size  # the global batch
    n_batches = n // step if drop_last else -(-n // step)
    if n_batches == 0:
        raise ValueError(f"fit: drop_last=True with batch_size {step} > {n} samples leaves no batch")
    keys = ["loss"] + (["accuracy"] if classification else [])
    if validation_data is not None:
        keys += ["val_loss"] + (["val_accuracy"] if classification else [])
    history: dict[str, list[float]] = {k: [] for k in keys + ["lr", "seconds"]}
    with _restoring_mode(model, default=True):
        for epoch in range(epochs):
            model.train()
            lr = float(optimizer.param_groups[0]["lr"])
            order = rng.permutation(n) if shuffle else np.arange(n)
            bar = _Progress(progress and dp.rank == 0, n_batches, f"Epoch {epoch + 1}/{epochs}")
            t0 = time.perf_counter()
            total_loss = 0.0
            correct = 0
            seen = 0
            for b in range(n_batches):
                batch = order[b * step:(b + 1) * step]
                idx = dp.share(batch)
                xb, yb = X[idx], y[idx]
                out = model(xb)
                if len(idx):
                    value = loss(out, yb)
                    grad = loss.backward()
                    if dp.size > 1 and per_sample_mean:  # this rank's share of the global mean
                        grad = grad * (len(idx) / len(batch))
                else:  # a rank without samples still takes part in the model's collectives
                    value, grad = 0.0, np.zeros_like(out)
                optimizer.zero_grad()
                model.backward(grad)
                dp.sum_grads(params)
                optimizer.step()
                total_loss += value * len(idx)
                seen += len(idx)
                if classification and len(idx):
                    correct += _n_correct(out, yb)
                bar.update(value)
            seconds = time.perf_counter() - t0
            total_loss, correct, seen = dp.sum([total_loss, correct, seen])
            entry: dict[str, float] = {"loss": total_loss / seen}
            if classification:
                entry["accuracy"] = correct / seen
            if validation_data is not None:
                val = _evaluate_shared(model, loss, Xv, yv, max(batch_size, 256), dp)
                entry["val_loss"] = val["loss"]
                if classification:
                    entry["val_accuracy"] = val["accuracy"]
            entry["lr"] = lr
            entry["seconds"] = seconds
            for k in history:
                history[k].append(entry[k])
            bar.close(_format(entry))
            if scheduler is not None:
                scheduler.step()
    return history


def _params(optimizer: Any) -> list[Any]:
    """The parameters an optimizer updates, group by group."""
    return [p for g in optimizer.param_groups for p in g["params"]]


def _evaluate_shared(model: Any, loss: Any, X: np.ndarray, y: np.ndarray, batch_size: int,
                     dp: Any) -> dict[str, float]:
    """:func:`evaluate` with the samples split among the ranks and the sums reduced over them."""
    idx = dp.share(np.arange(len(X)))
    total, correct = _evaluate_sums(model, loss, X[idx], y[idx], batch_size) if len(idx) else (0.0, 0)
    total, correct, count = dp.sum([total, correct, len(idx)])
    result = {"loss": total / count}
    if isinstance(loss, CrossEntropyLoss):
        result["accuracy"] = correct / count
    return result


def evaluate(model: Any, loss: Any, X: Any, y: Any, batch_size: int = 256) -> dict[str, float]:
    """Loss (and accuracy for classification) of ``model`` on a data set, in evaluation mode.

    Parameters
    ----------
    model : layer
        Any object following the layer contract.
    loss : CrossEntropyLoss, MSELoss or compatible
        Called as ``loss(pred, target) -> float``.
    X, y : array_like
        Inputs and targets with the same number of samples.
    batch_size : int, default 256
        Samples per forward pass.

    Returns
    -------
    dict
        ``{"loss": ...}`` (mean over samples) plus ``"accuracy"`` for
        :class:`CrossEntropyLoss`.  The model's mode is restored afterwards.
    """
    X, y = _check_xy(X, y, "evaluate")
    batch_size = _check_batch_size(batch_size, "evaluate")
    total, correct = _evaluate_sums(model, loss, X, y, batch_size)
    result = {"loss": total / len(X)}
    if isinstance(loss, CrossEntropyLoss):
        result["accuracy"] = correct / len(X)
    return result


def _evaluate_sums(model: Any, loss: Any, X: np.ndarray, y: np.ndarray, batch_size: int) -> tuple[float, int]:
    """(summed loss, correct predictions) over ``X`` in evaluation mode; the mode is restored."""
    classification = isinstance(loss, CrossEntropyLoss)
    total = 0.0
    correct = 0
    with _restoring_mode(model, default=False):
        model.eval()
        for s in range(0, len(X), batch_size):
            xb, yb = X[s:s + batch_size], y[s:s + batch_size]
            out = model(xb)
            total += loss(out, yb) * len(xb)
            if classification:
                correct += _n_correct(out, yb)
    return total, correct


def predict(model: Any, X: Any, batch_size: int = 256) -> np.ndarray:
    """Compute the outputs of ``model`` for every sample of ``X``, in evaluation mode.

    Parameters
    ----------
    model : layer
        Any object following the layer contract.
    X : array_like
        Inputs, samples along the first dimension.
    batch_size : int, default 256
        Samples per forward pass.

    Returns
    -------
    numpy.ndarray
        The outputs concatenated along the first axis (logits for a
        classifier: take ``argmax(axis=1)`` for labels).  The model's mode is
        restored afterwards.
    """
    X = np.asarray(X)
    if X.ndim < 1 or len(X) == 0:
        raise ValueError("predict: X must have at least one sample")
    batch_size = _check_batch_size(batch_size, "predict")
    with _restoring_mode(model, default=False):
        model.eval()
        outs = [np.asarray(model(X[s:s + batch_size])) for s in range(0, len(X), batch_size)]
    return np.concatenate(outs, axis=0)
