"""bnfast: fast, accurate batch normalization for NumPy on the CPU.

C kernels (OpenMP, SIMD) for batch-norm training forward, inference and
backward in channels-first and channels-last layouts, float32 and float64,
with one-pass Welford statistics merged by Chan's formula.
"""

from ._version import __version__
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
from .layers import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, recalibrate
from .fold import fold_batch_norm
from . import nn, testing
from . import _threadpool

_threadpool.register()  # threadpoolctl sees and limits bnfast's threads, when it is installed

__all__ = [
    "__version__",
    "nn",
    "testing",
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
