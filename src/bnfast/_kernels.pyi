"""Type stubs for the compiled bridge to the C kernels (bnfast._kernels)."""

import numpy as np

Shape3 = tuple[int, int, int]
# element strides (outer, channel), or (outer, channel, sample) for a keyed call
Strides2 = tuple[int, ...]
# () for batch norm, or bn_keys: (batch, group, uncentered, affine_inner)
Keys = tuple[int, ...]

def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def set_contention_backoff(enabled: bool) -> None: ...
def contention_backoff() -> tuple[bool, float]: ...
def _next_call_threads(report: int | None = ...) -> int: ...
def max_threads() -> int: ...
def forked_child() -> bool: ...
def openmp_enabled() -> bool: ...
def simd_compiled() -> str: ...
def simd_in_use() -> str: ...
def simd_available() -> list[str]: ...
def select_isa(name: str) -> str: ...
def cache_sizes() -> dict[str, int | None]: ...
def stream_threshold() -> int: ...
def set_stream_threshold(nbytes: int | None = None) -> int: ...
def traffic(out: np.ndarray, a: np.ndarray, b: np.ndarray | None = None) -> None: ...
def _task_grid(outer: int, channels: int, inner: int) -> tuple[int, int, int]: ...
def moments(
    shape: Shape3, x: np.ndarray, xs: Strides2, count: np.ndarray, mean: np.ndarray, m2: np.ndarray,
    keys: Keys = (),
) -> None: ...
def forward_train(
    shape: Shape3,
    x: np.ndarray,
    xs: Strides2,
    y: np.ndarray,
    ys: Strides2,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    momentum: float,
    eps: float,
    save_mean: np.ndarray,
    save_invstd: np.ndarray,
    keys: Keys = (),
    act: tuple[int, float, np.ndarray | None, Strides2 | None] | None = None,
    statistics: tuple[float, float, float, np.ndarray | None, np.ndarray | None, int, np.ndarray] | None = None,
) -> None: ...
def inference(
    shape: Shape3,
    x: np.ndarray,
    xs: Strides2,
    y: np.ndarray,
    ys: Strides2,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    eps: float,
    act: tuple[int, float, np.ndarray | None, Strides2 | None] | None = None,
) -> None: ...
def backward(
    shape: Shape3,
    grad_out: np.ndarray,
    gs: Strides2,
    x: np.ndarray,
    xs: Strides2,
    grad_in: np.ndarray,
    gis: Strides2,
    save_mean: np.ndarray | None,
    save_invstd: np.ndarray,
    weight: np.ndarray | None,
    training: bool,
    grad_weight: np.ndarray,
    grad_bias: np.ndarray,
    keys: Keys = (),
    act: tuple[int, float, np.ndarray | None, Strides2 | None] | None = None,
    share: float = 1.0,
    ref_mean: np.ndarray | None = None,
) -> None: ...

# fast path: results for canonical arguments, None for anything else
def try_forward_train(
    x: object,
    weight: object,
    bias: object,
    running_mean: object,
    running_var: object,
    momentum: object,
    eps: object,
    axis: object,
    out: object = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None: ...
def try_inference(
    x: object,
    running_mean: object,
    running_var: object,
    weight: object,
    bias: object,
    eps: object,
    axis: object,
    out: object = None,
) -> np.ndarray | None: ...
def try_backward(
    grad_out: object,
    x: object,
    save_mean: object,
    save_invstd: object,
    weight: object,
    training: object,
    axis: object,
    out: object = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None: ...
def try_rows_forward(
    x: object,
    normalized_shape: object,
    weight: object,
    bias: object,
    eps: object,
    rms: bool,
    out: object = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None: ...
def try_rows_backward(
    grad_out: object,
    x: object,
    normalized_shape: object,
    mean: object,
    invstd: object,
    weight: object,
    rms: bool,
    out: object = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None: ...
def try_keyed_forward(
    x: object,
    num_groups: object,
    weight: object,
    bias: object,
    running_mean: object,
    running_var: object,
    momentum: object,
    eps: object,
    axis: object,
    instance: bool,
    out: object = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None: ...
def try_keyed_backward(
    grad_out: object,
    x: object,
    num_groups: object,
    mean: object,
    invstd: object,
    weight: object,
    axis: object,
    instance: bool,
    out: object = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None: ...
