"""bnfast: fast, accurate batch normalization for NumPy on the CPU.

C kernels (OpenMP, SIMD) for batch-norm training forward, inference and
backward in channels-first and channels-last layouts, float32 and float64,
with one-pass Welford statistics merged by Chan's formula.
"""

from ._config import show_config
from ._functional import (
    batch_norm,
    batch_norm_backward,
    batch_norm_forward,
    batch_norm_inference,
    get_num_threads,
    moments,
    set_num_threads,
)
from ._moments import Moments
from ._parameter import Parameter
from .nn.module import Module
from .nn.normalization import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .nn.recalibration import recalibrate
from .fold import fold_batch_norm
from . import nn, testing

__version__ = "0.1.0"

__all__ = [
    "nn",
    "testing",
    "Module",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "fold_batch_norm",
    "recalibrate",
    "Moments",
    "Parameter",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_forward",
    "batch_norm_inference",
    "get_num_threads",
    "moments",
    "set_num_threads",
    "show_config",
]
