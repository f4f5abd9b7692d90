"""Autograd-free training helper: layers, losses, optimizers, schedules and a fit loop.

Names, argument orders and parameter shapes follow ``torch.nn`` /
``torch.optim`` so models and weights port both ways.  Every layer is a
:class:`Module` (``nn/module.py``, the contract of ``torch.nn.Module``: registered
parameters, buffers and children, ``train``/``eval``, ``state_dict``...) with an
explicit ``backward(grad_out) -> grad_input`` that stores parameter gradients
in :class:`Parameter` ``.grad``; normalization layers (``nn/normalization.py``)
run on bnfast's kernels.

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

from .._parameter import Parameter
from .module import IncompatibleKeys, Module, RemovableHandle, StateDictError
from .normalization import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LayerNorm,
    RMSNorm,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    FilterResponseNorm2d,
    SyncBatchNorm,
)
from .variants import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    CrossIterationBatchNorm1d,
    CrossIterationBatchNorm2d,
    MomentumBatchNorm1d,
    MomentumBatchNorm2d,
    MomentumBatchNorm3d,
)
from .layers import Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU, Sequential
from .activations import ELU, LeakyReLU, Residual
from .recalibration import recalibrate
from .losses import CrossEntropyLoss, MSELoss
from .optim import SGD, Adam, Optimizer, clip_grad_norm_
from .schedulers import CosineAnnealingLR, LRScheduler, StepLR
from .training import evaluate, fit, predict
from . import utils

__all__ = [
    "Module",
    "Parameter",
    "IncompatibleKeys",
    "StateDictError",
    "RemovableHandle",
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
    "LayerNorm",
    "RMSNorm",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "FilterResponseNorm2d",
    "SyncBatchNorm",
    "recalibrate",
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
    "utils",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "MomentumBatchNorm1d",
    "MomentumBatchNorm2d",
    "MomentumBatchNorm3d",
    "CrossIterationBatchNorm1d",
    "CrossIterationBatchNorm2d",
    "LeakyReLU",
    "ELU",
    "Residual",
]
