"""bnfast: fast, accurate batch normalization and its family for NumPy on the CPU.

C kernels (OpenMP, SIMD) for batch-norm training forward, inference and
backward in channels-first and channels-last layouts, float32 and float64,
with one-pass Welford statistics merged by Chan's formula; layer, RMS, group,
instance and filter response normalization on the same kernels.
"""

from ._version import __version__ as __version__  # re-exported (also for mypy --strict)
from ._config import get_include, show_config
from ._functional import (
    batch_norm,
    batch_norm_backward,
    batch_norm_forward,
    batch_norm_inference,
    get_contention_backoff,
    get_num_threads,
    moments,
    set_contention_backoff,
    set_num_threads,
)
from ._normalization import (
    filter_response_norm,
    filter_response_norm_backward,
    filter_response_norm_forward,
    group_norm,
    group_norm_backward,
    group_norm_forward,
    instance_norm,
    instance_norm_backward,
    instance_norm_forward,
    layer_norm,
    layer_norm_backward,
    layer_norm_forward,
    rms_norm,
    rms_norm_backward,
    rms_norm_forward,
)
from ._double_backward import batch_norm_double_backward
from ._moments import Moments
from ._parameter import Parameter
from .nn.module import Module
from .nn.normalization import (
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
from .nn.variants import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    CrossIterationBatchNorm1d,
    CrossIterationBatchNorm2d,
    MomentumBatchNorm1d,
    MomentumBatchNorm2d,
    MomentumBatchNorm3d,
)
from .nn.recalibration import recalibrate
from .fold import fold_batch_norm
from ._fused import batch_norm_act_backward, batch_norm_act_forward, batch_norm_act_inference
from . import nn, testing
from . import distributed
from . import _threadpool

_threadpool.register()  # threadpoolctl sees and limits bnfast's threads, when it is installed

__all__ = [
    "nn",
    "testing",
    "Module",
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
    "distributed",
    "fold_batch_norm",
    "recalibrate",
    "Moments",
    "Parameter",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_double_backward",
    "batch_norm_forward",
    "batch_norm_inference",
    "get_contention_backoff",
    "get_num_threads",
    "moments",
    "set_contention_backoff",
    "set_num_threads",
    "layer_norm",
    "layer_norm_forward",
    "layer_norm_backward",
    "rms_norm",
    "rms_norm_forward",
    "rms_norm_backward",
    "group_norm",
    "group_norm_forward",
    "group_norm_backward",
    "instance_norm",
    "instance_norm_forward",
    "instance_norm_backward",
    "filter_response_norm",
    "filter_response_norm_forward",
    "filter_response_norm_backward",
    "show_config",
    "get_include",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "MomentumBatchNorm1d",
    "MomentumBatchNorm2d",
    "MomentumBatchNorm3d",
    "CrossIterationBatchNorm1d",
    "CrossIterationBatchNorm2d",
    "batch_norm_act_forward",
    "batch_norm_act_inference",
    "batch_norm_act_backward",
]
