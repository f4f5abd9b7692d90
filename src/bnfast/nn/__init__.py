"""Autograd-free training helper: layers, losses, optimizers, schedules and a fit loop.

Names, argument orders and parameter shapes follow ``torch.nn`` /
``torch.optim`` so models and weights port both ways.  Every layer has an
explicit ``backward(grad_out) -> grad_input`` that stores parameter gradients
in :class:`~bnfast._parameter.Parameter` ``.grad``; normalization runs on
bnfast's kernels through the BatchNorm layers re-exported here.

Examples
--------
>>> import numpy as np
>>> from bnfast import nn
>>> model = nn.Sequential(nn.Linear(4, 16, rng=0), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3, rng=1))
>>> loss, opt = nn.CrossEntropyLoss(), nn.SGD(model.parameters(), lr=0.1, momentum=0.9)
>>> x, y = np.ones((8, 4), np.float32), np.zeros(8, np.int64)
>>> value = loss(model(x), y)
>>> opt.zero_grad(); _ = model.backward(loss.backward()); opt.step()
"""

from ..layers import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .._parameter import Parameter
from .layers import Conv2d, Dropout, Flatten, Linear, MaxPool2d, Module, ReLU, Sequential
from .losses import CrossEntropyLoss, MSELoss
from .optim import SGD, Adam, Optimizer, clip_grad_norm_
from .schedulers import CosineAnnealingLR, LRScheduler, StepLR
from .training import evaluate, fit, predict

__all__ = [
    "Module",
    "Parameter",
    "Linear",
    "Conv2d",
    "ReLU",
    "Flatten",
    "MaxPool2d",
    "Dropout",
    "Sequential",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "CrossEntropyLoss",
    "MSELoss",
    "Optimizer",
    "SGD",
    "Adam",
    "clip_grad_norm_",
    "LRScheduler",
    "StepLR",
    "CosineAnnealingLR",
    "fit",
    "evaluate",
    "predict",
]
