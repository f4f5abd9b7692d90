"""Learning-rate schedules with ``torch.optim.lr_scheduler`` semantics.

Create the scheduler after the optimizer and call :meth:`step` once per
epoch, after the optimizer's steps of that epoch (``fit`` does this for
you).  The learning rate is written into every ``optimizer.param_groups``
entry.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["LRScheduler", "StepLR", "CosineAnnealingLR"]


def _epochs(value: Any, name: str, who: str) -> int:
    """``int(value)``, required to be at least one epoch."""
    if int(value) < 1:
        raise ValueError(f"{who}: {name} must be >= 1, got {value}")
    return int(value)


class LRScheduler:
    """Base class: keeps ``last_epoch`` and writes ``lr`` into the optimizer.

    Parameters
    ----------
    optimizer : bnfast.nn.Optimizer
        Any object with torch-style ``param_groups``.
    last_epoch : int, default -1
        Index of the last epoch; -1 starts a fresh schedule.
    """

    def __init__(self, optimizer: Any, last_epoch: int = -1) -> None:
        self.optimizer = optimizer
        for g in optimizer.param_groups:
            if last_epoch == -1:
                g.setdefault("initial_lr", g["lr"])
            elif "initial_lr" not in g:
                raise KeyError("param 'initial_lr' is not specified in param_groups when resuming a schedule")
        self.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        self.last_epoch = last_epoch
        self.step()

    def get_lr(self) -> list[float]:  # pragma: no cover - abstract
        """Compute the learning rates for ``last_epoch``; subclasses implement it.

        Returns
        -------
        list of float
            One learning rate per parameter group.
        """
        raise NotImplementedError

    def step(self) -> None:
        """Advance one epoch and update the optimizer's learning rates."""
        self.last_epoch += 1
        lrs = self.get_lr()
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr
        self._last_lr = list(lrs)

    def get_last_lr(self) -> list[float]:
        """Learning rates set by the last :meth:`step`, one per group.

        Returns
        -------
        list of float
            One learning rate per parameter group.
        """
        return list(self._last_lr)

    def state_dict(self) -> dict:
        """Return the scheduler's state (everything but the optimizer).

        Returns
        -------
        dict
            The scheduler's attributes, for :meth:`load_state_dict`.
        """
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from :meth:`state_dict`.

        Parameters
        ----------
        state : dict
            As returned by :meth:`state_dict`.
        """
        self.__dict__.update(state)


class StepLR(LRScheduler):
    """Multiply the learning rate by ``gamma`` every ``step_size`` epochs.

    ``lr = initial_lr * gamma ** (epoch // step_size)``, as
    ``torch.optim.lr_scheduler.StepLR``.

    Parameters
    ----------
    optimizer : bnfast.nn.Optimizer
        The optimizer whose learning rates are scheduled.
    step_size : int
        Period of the decay, in epochs (calls to :meth:`step`).
    gamma : float, default 0.1
        Factor of each decay.
    last_epoch : int, default -1
        Index of the last epoch; -1 starts a fresh schedule.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast._parameter import Parameter
    >>> from bnfast.nn import SGD, StepLR
    >>> opt = SGD([Parameter(np.zeros(1))], lr=1.0)
    >>> sched = StepLR(opt, step_size=2, gamma=0.5)
    >>> lrs = []
    >>> for _ in range(5):
    ...     lrs.append(opt.lr); sched.step()
    >>> lrs
    [1.0, 1.0, 0.5, 0.5, 0.25]
    """

    def __init__(self, optimizer: Any, step_size: int, gamma: float = 0.1, last_epoch: int = -1) -> None:
        self.step_size = _epochs(step_size, "step_size", "StepLR")
        self.gamma = float(gamma)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """Compute the learning rates for ``last_epoch``.

        Returns
        -------
        list of float
            One learning rate per parameter group.
        """
        return [b * self.gamma ** (self.last_epoch // self.step_size) for b in self.base_lrs]


class CosineAnnealingLR(LRScheduler):
    """Cosine annealing from the initial rate to ``eta_min`` over ``T_max`` epochs.

    ``lr = eta_min + (initial_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2``,
    the closed form of ``torch.optim.lr_scheduler.CosineAnnealingLR``
    (without restarts).

    Parameters
    ----------
    optimizer : bnfast.nn.Optimizer
        The optimizer whose learning rates are scheduled.
    T_max : int
        Number of epochs of the half cosine.
    eta_min : float, default 0
        Final learning rate.
    last_epoch : int, default -1
        Index of the last epoch; -1 starts a fresh schedule.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast._parameter import Parameter
    >>> from bnfast.nn import SGD, CosineAnnealingLR
    >>> opt = SGD([Parameter(np.zeros(1))], lr=1.0)
    >>> sched = CosineAnnealingLR(opt, T_max=2)
    >>> sched.step(); round(opt.lr, 6)
    0.5
    """

    def __init__(self, optimizer: Any, T_max: int, eta_min: float = 0.0, last_epoch: int = -1) -> None:
        self.T_max = _epochs(T_max, "T_max", "CosineAnnealingLR")
        self.eta_min = float(eta_min)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """Compute the learning rates for ``last_epoch``.

        Returns
        -------
        list of float
            One learning rate per parameter group.
        """
        c = (1 + math.cos(math.pi * self.last_epoch / self.T_max)) / 2
        return [self.eta_min + (b - self.eta_min) * c for b in self.base_lrs]
