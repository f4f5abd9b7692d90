"""Mergeable per-channel statistics: the Welford state (count, mean, M2)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["Moments"]


class Moments:
    """Per-channel Welford state: count, mean and sum of squared deviations.

    States of disjoint pieces of data merge exactly (Chan et al.'s formula),
    so statistics of a data set too large for one call, or spread over
    workers, are those of the whole.  ``bnfast.moments`` makes one.

    Parameters
    ----------
    count : array_like of int, shape (C,)
        Values seen per channel.
    mean : array_like of float, shape (C,)
        Mean per channel (0 where count is 0).
    m2 : array_like of float, shape (C,)
        Sum of squared deviations from the mean per channel.

    Attributes
    ----------
    count : numpy.ndarray of int64, shape (C,)
        Values seen per channel.
    mean : numpy.ndarray of float64, shape (C,)
        Mean per channel.
    m2 : numpy.ndarray of float64, shape (C,)
        Sum of squared deviations from the mean per channel.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> a, b = np.random.rand(8, 3, 5), np.random.rand(4, 3, 5)
    >>> whole = bnfast.moments(a).merge(bnfast.moments(b))
    >>> np.allclose(whole.var(), np.concatenate([a, b]).var(axis=(0, 2)))
    True
    """

    __slots__ = ("count", "mean", "m2")

    def __init__(self, count: ArrayLike, mean: ArrayLike, m2: ArrayLike) -> None:
        self.count = np.asarray(count, dtype=np.int64).reshape(-1)
        self.mean = np.asarray(mean, dtype=np.float64).reshape(-1)
        self.m2 = np.asarray(m2, dtype=np.float64).reshape(-1)
        if not (self.count.shape == self.mean.shape == self.m2.shape):
            raise ValueError(
                f"count, mean and m2 must have one shape, got {self.count.shape}, "
                f"{self.mean.shape} and {self.m2.shape}"
            )

    @classmethod
    def zeros(cls, num_channels: int) -> "Moments":
        """Make the empty state of ``num_channels`` channels: the identity of `merge`.

        Parameters
        ----------
        num_channels : int
            Number of channels C.

        Returns
        -------
        Moments
            Counts, means and ``m2`` all zero.
        """
        return cls(np.zeros(num_channels, np.int64), np.zeros(num_channels), np.zeros(num_channels))

    def __len__(self) -> int:
        return self.count.shape[0]

    def merge(self, other: "Moments") -> "Moments":
        """Merge two states: the statistics of the union of the data behind ``self`` and ``other``.

        Parameters
        ----------
        other : Moments
            State of the same number of channels.

        Returns
        -------
        Moments
            A new state; neither operand changes.
        """
        if not isinstance(other, Moments):
            raise TypeError(f"can only merge Moments, got {type(other).__name__}")
        if len(other) != len(self):
            raise ValueError(f"cannot merge states of {len(self)} and {len(other)} channels")
        na = self.count.astype(np.float64)
        nb = other.count.astype(np.float64)
        n = na + nb
        with np.errstate(invalid="ignore", divide="ignore"):
            share_b = np.where(n > 0, nb / n, 0.0)
        delta = other.mean - self.mean
        mean = np.where(nb == 0, self.mean, np.where(na == 0, other.mean, self.mean + delta * share_b))
        m2 = np.where(
            nb == 0,
            self.m2,
            np.where(na == 0, other.m2, self.m2 + other.m2 + delta * delta * na * share_b),
        )
        return Moments(self.count + other.count, mean, m2)

    def var(self, ddof: int = 0) -> np.ndarray:
        """Variance per channel, ``m2 / (count - ddof)`` (NaN where undefined).

        Parameters
        ----------
        ddof : int, default 0
            0 for the biased (population) variance, 1 for the unbiased one.

        Returns
        -------
        numpy.ndarray of float64, shape (C,)
            The variance of each channel.
        """
        with np.errstate(invalid="ignore", divide="ignore"):
            denom = (self.count - ddof).astype(np.float64)
            return np.where(denom > 0, self.m2 / np.where(denom > 0, denom, 1.0), np.nan)

    def __repr__(self) -> str:
        return f"Moments(channels={len(self)}, count={self.count.tolist() if len(self) <= 8 else '...'})"
