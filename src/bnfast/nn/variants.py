"""Batch normalization for small and shifting batches: Batch Renormalization,
Momentum Batch Normalization and Cross-Iteration Batch Normalization.

All three are :class:`~bnfast.nn.BatchNorm` layers (same parameters, buffers,
eval mode and ``state_dict`` keys, plus their own) that normalize in training
with statistics other than the batch's alone.  Each forward is one call of
the batch-norm training-forward kernel, whose finish step turns the batch
statistics into the ones used (``bn_forward_args``: a prior mixed in, or
batch renormalization's clipped correction), and each backward one call of
the batch-norm backward kernel, with the statistics it treats as constants
taken out in closed form:

* Batch Renorm: the batch statistics with weight ``weight * r`` and bias
  ``bias + weight * d``, ``r`` and ``d`` constants;
* Momentum BN and cross-iteration BN: statistics of which the current batch
  is a share ``c`` (``1 - lambda``, ``1 / k``); the gradient is
  ``s*w*(g - c*mean(g) - c*s*(x - m_ref)*mean(g*x_hat))`` per channel, the
  backward kernel's own expression with its statistics terms scaled
  (``bn_backward_args.share``, ``ref_mean``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._functional import _momentum, _real, batch_norm_backward, moments
from .._variants import shared_batch_norm_backward, statistics_forward
from .layers import Conv2d, Linear
from .normalization import BatchNorm, _int_at_least, _plain

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "MomentumBatchNorm1d",
    "MomentumBatchNorm2d",
    "MomentumBatchNorm3d",
    "CrossIterationBatchNorm1d",
    "CrossIterationBatchNorm2d",
]

_F64 = np.float64


def _rank_check(layer: BatchNorm, ndim: int) -> None:
    ranks = layer._ranks
    if ndim not in ranks:
        want = " or ".join(f"{r}D" for r in ranks)
        raise ValueError(f"expected {want} input (got {ndim}D input)")


class _StatisticsNorm(BatchNorm):
    """A BatchNorm whose training forward picks its own statistics.

    Subclasses implement ``_train_forward(x, w, b, factor, count) -> y``
    (one kernel call, then their own state) and set ``_saved`` to
    ``(x, mean, invstd, share, reference_mean, r, d)``: the statistics used
    in the layer's dtype, the rest float64 or None, read by the one
    :meth:`backward`.
    """

    _ranks: tuple[int, ...] = ()

    def _check_rank(self, ndim: int) -> None:
        _rank_check(self, ndim)

    def _kernel_forward(self, x: np.ndarray, w: np.ndarray | None, b: np.ndarray | None, factor: float,
                        **statistics: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One training-forward kernel call (`bnfast._variants.statistics_forward`)."""
        return statistics_forward(x, w, b, self._buffers["running_mean"], self._buffers["running_var"],
                                  momentum=factor, eps=self.eps, axis=self._axis, **statistics)

    def _train_forward(self, x: np.ndarray, w: np.ndarray | None, b: np.ndarray | None,
                       factor: float, count: int | None) -> np.ndarray:
        raise NotImplementedError

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Normalize ``x``; in training mode with the layer's statistics.

        Parameters
        ----------
        x : numpy.ndarray
            Input of the layer's dtype with ``num_features`` channels on ``axis``.

        Returns
        -------
        numpy.ndarray
            Normalized output, x's shape and dtype.

        Raises
        ------
        TypeError
            Input of another dtype.
        ValueError
            Wrong rank or channel count, one value per channel, a bad
            ``eps``/``momentum``; nothing is modified then.
        """
        if not self.training or self._moment_sink is not None:
            return super().forward(x)
        x = self._check_input(x)
        if self.virtual_batch_size is not None:
            raise ValueError(f"{type(self).__name__} does not support virtual_batch_size (set it to None)")
        params = self._parameters
        w, b = _plain(params["weight"]), _plain(params["bias"])
        factor, count = self._factor()
        factor = _momentum(factor)
        y = self._train_forward(x, w, b, factor, count)
        nbt = self._buffers["num_batches_tracked"]
        if count is not None and nbt is not None:
            nbt[...] = count
        return y

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """Gradient w.r.t. the input of the last :meth:`forward`; sets the parameters' ``grad``.

        Parameters
        ----------
        grad_out : numpy.ndarray
            Gradient w.r.t. the output, the last input's shape and dtype.

        Returns
        -------
        numpy.ndarray
            Gradient w.r.t. the input.

        Raises
        ------
        RuntimeError
            No forward has been run yet.
        ValueError, TypeError
            ``grad_out`` of another shape or dtype.
        """
        saved = self._saved
        if saved is None or len(saved) == 4:  # eval mode or a plain BatchNorm forward
            return super().backward(grad_out)
        x, mean, invstd, share, ref, r, d = saved
        grad_out = np.asarray(grad_out)
        if grad_out.shape != x.shape:
            raise ValueError(f"grad_out has shape {grad_out.shape} but the last input to forward had shape {x.shape}")
        weight, bias = self._parameters["weight"], self._parameters["bias"]
        w = None if weight is None else weight.data.astype(_F64)
        w_eff = w if r is None else (r if w is None else w * r)
        w_eff_t = None if w_eff is None else w_eff.astype(self._dtype)
        if share == 1.0:  # the statistics are the batch's: batch norm's backward
            gx, gw, gb = batch_norm_backward(grad_out, x, mean, invstd, w_eff_t, training=True, axis=self._axis)
        else:
            gx, gw, gb = shared_batch_norm_backward(grad_out, x, mean, invstd, w_eff_t, share, ref, axis=self._axis)
        if weight is not None:
            gw64 = gw.astype(_F64)
            if r is not None:  # d y / d weight = x_hat * r + d
                gw64 = gw64 * r + gb.astype(_F64) * d
            weight.grad = gw64.astype(weight.dtype)
        if bias is not None:
            bias.grad = gb
        return gx


# ---------------------------------------------------------------------- Batch Renorm
class _BatchRenorm(_StatisticsNorm):
    """Batch Renormalization (Ioffe 2017); see BatchRenorm1d/2d/3d."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Any = 0.01, affine: bool = True, *,
                 r_max: float = 3.0, d_max: float = 5.0, axis: int = 1, dtype: Any = np.float32) -> None:
        super().__init__(num_features, eps, momentum, affine, True, axis=axis, dtype=dtype)
        self.r_max = r_max
        self.d_max = d_max

    @property
    def r_max(self) -> float:
        """Clip of ``r`` to ``[1 / r_max, r_max]`` (>= 1; settable, for the warm-up schedule)."""
        return self.__dict__["_r_max"]

    @r_max.setter
    def r_max(self, value: float) -> None:
        v = _real(value, "r_max")
        if not v >= 1.0:
            raise ValueError(f"r_max must be >= 1 (got {value!r})")
        self.__dict__["_r_max"] = v

    @property
    def d_max(self) -> float:
        """Clip of ``d`` to ``[-d_max, d_max]`` (>= 0; settable, for the warm-up schedule)."""
        return self.__dict__["_d_max"]

    @d_max.setter
    def d_max(self, value: float) -> None:
        v = _real(value, "d_max")
        if not v >= 0.0:
            raise ValueError(f"d_max must be >= 0 (got {value!r})")
        self.__dict__["_d_max"] = v

    def _train_forward(self, x, w, b, factor, count):
        y, mean, invstd, stats = self._kernel_forward(x, w, b, factor, r_max=self.r_max, d_max=self.d_max)
        self.__dict__["_saved"] = (x, mean, invstd, 1.0, None, stats[2].copy(), stats[3].copy())
        return y

    def extra_repr(self) -> str:
        """The argument part of the repr.

        Returns
        -------
        str
            BatchNorm's, then ``r_max`` and ``d_max``.
        """
        return f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}"


_RENORM_DOC = """Batch Renormalization of {shape} input (Ioffe 2017).

    Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in
    Batch-Normalized Models", NeurIPS 2017.
    In training, with the batch mean and standard deviation ``mu_B``,
    ``sigma_B = sqrt(var_B + eps)`` and the running ``mu``,
    ``sigma = sqrt(running_var + eps)``::

        r = clip(sigma_B / sigma, 1 / r_max, r_max)
        d = clip((mu_B - mu) / sigma, -d_max, d_max)
        y = weight * ((x - mu_B) / sigma_B * r + d) + bias

    ``r`` and ``d`` are constants in backward (the gradient flows through
    the batch statistics as in batch normalization); ``weight.grad`` is
    ``sum(grad_out * (x_hat * r + d))``.  The running statistics are updated
    as :class:`BatchNorm` does (``running_var`` with the unbiased batch
    variance; the paper averages ``sigma`` instead), after ``r`` and ``d``
    are computed from the previous ones.  Eval mode normalizes with the
    running statistics.  With ``r_max=1`` and ``d_max=0`` the layer is
    batch normalization, bit for bit (outputs, running statistics,
    gradients).  ``r_max`` and ``d_max`` may be changed
    between calls (the paper's warm-up: 1 and 0, relaxed to 3 and 5).

    Parameters
    ----------
    num_features : int
        Number of channels C.
    eps : float, default 1e-5
        Added to the variances.
    momentum : float, callable or None, default 0.01
        Running-statistics factor, as :class:`BatchNorm`'s.
    affine : bool, default True
        Learn ``weight`` and ``bias``.
    r_max : float >= 1, default 3.0
        Clip of ``r`` (keyword only).
    d_max : float >= 0, default 5.0
        Clip of ``d`` (keyword only).
    axis : int, default 1
        The channel axis (keyword only); -1 for channels-last.
    dtype : float32 or float64, default float32
        Dtype of parameters, buffers and inputs (keyword only).

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> brn = bnfast.BatchRenorm{dim}({example_c}, r_max=1.0, d_max=0.0)
    >>> list(brn.state_dict())
    ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']
    """


class BatchRenorm1d(_BatchRenorm):
    __doc__ = _RENORM_DOC.format(shape="(N, C) or (N, C, L)", dim="1d", example_c=4)
    _ranks = (2, 3)


class BatchRenorm2d(_BatchRenorm):
    __doc__ = _RENORM_DOC.format(shape="(N, C, H, W)", dim="2d", example_c=4)
    _ranks = (4,)


class BatchRenorm3d(_BatchRenorm):
    __doc__ = _RENORM_DOC.format(shape="(N, C, D, H, W)", dim="3d", example_c=4)
    _ranks = (5,)


# ---------------------------------------------------------------------- Momentum BN
def mbn_lambda(step: int, total_steps: int, batch_size: int, ideal_batch_size: int = 32) -> float:
    """The dynamic momentum of Momentum Batch Normalization (Yong et al., ECCV 2020).

    ``lambda_t = rho ** (T / (T - 1) * max(T - t, 0)) - rho ** T`` with
    ``rho = min(m / m0, 1) ** (1 / T)``: 0 at the first step (batch
    normalization), rising to ``1 - min(m / m0, 1)`` at step ``T`` and
    after.  ``m`` is the batch size, ``m0`` the ideal one; with ``m >= m0``
    it is 0 throughout.

    Parameters
    ----------
    step : int >= 1
        The current step t.
    total_steps : int >= 2
        T, the step at which the momentum reaches its final value.
    batch_size : int >= 1
        m.
    ideal_batch_size : int >= 1, default 32
        m0.

    Returns
    -------
    float
        lambda in [0, 1).
    """
    T, t = float(total_steps), float(step)
    rho = min(batch_size / ideal_batch_size, 1.0) ** (1.0 / T)
    return max(rho ** (T / (T - 1.0) * max(T - t, 0.0)) - rho**T, 0.0)


class _MomentumBatchNorm(_StatisticsNorm):
    """Momentum Batch Normalization; see MomentumBatchNorm1d/2d/3d."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Any = 0.1, affine: bool = True, *,
                 total_steps: int, ideal_batch_size: int = 32, steps_per_epoch: int | None = None,
                 axis: int = 1, dtype: Any = np.float32) -> None:
        total_steps = _int_at_least(total_steps, "total_steps", 2)
        ideal_batch_size = _int_at_least(ideal_batch_size, "ideal_batch_size", 1)
        if steps_per_epoch is not None:
            steps_per_epoch = _int_at_least(steps_per_epoch, "steps_per_epoch", 1)
        super().__init__(num_features, eps, momentum, affine, True, axis=axis, dtype=dtype)
        self.total_steps = total_steps
        self.ideal_batch_size = ideal_batch_size
        self.steps_per_epoch = steps_per_epoch
        C, dt = self.num_features, self._dtype
        self.register_buffer("momentum_mean", np.zeros(C, dtype=dt))
        self.register_buffer("momentum_var", np.ones(C, dtype=dt))

    def reset_running_stats(self) -> None:
        """Reset as BatchNorm does, and the momentum statistics to 0 and 1 (in place)."""
        super().reset_running_stats()
        self._buffers["momentum_mean"].fill(0)
        self._buffers["momentum_var"].fill(1)

    def _train_forward(self, x, w, b, factor, count):
        step = count if count is not None else 1
        if self.steps_per_epoch is not None:  # the paper's t: the epoch, 1 from the first step on
            step = (step - 1) // self.steps_per_epoch + 1
        lam = mbn_lambda(step, self.total_steps, x.shape[0], self.ideal_batch_size)
        mm, mv = self._buffers["momentum_mean"], self._buffers["momentum_var"]
        y, mean, invstd, stats = self._kernel_forward(x, w, b, factor, share=1.0 - lam,
                                                      prior_mean=lam * mm.astype(_F64),
                                                      prior_var=lam * mv.astype(_F64))
        mm[...] = stats[2]
        mv[...] = stats[3]
        self.last_lambda = lam
        self.__dict__["_saved"] = (x, mean, invstd, 1.0 - lam, stats[0].copy(), None, None)
        return y

    def extra_repr(self) -> str:
        """The argument part of the repr.

        Returns
        -------
        str
            BatchNorm's, then ``total_steps``, ``ideal_batch_size`` and, when
            set, ``steps_per_epoch``.
        """
        text = f"{super().extra_repr()}, total_steps={self.total_steps}, ideal_batch_size={self.ideal_batch_size}"
        return text + (f", steps_per_epoch={self.steps_per_epoch}" if self.steps_per_epoch is not None else "")


_MBN_DOC = """Momentum Batch Normalization of {shape} input (Yong et al. 2020).

    Yong, Huang, Meng, Hua and Zhang, "Momentum Batch Normalization for Deep
    Learning with Small Batch Size", ECCV 2020.
    In training the batch statistics are averaged with the history::

        mu_M  = lambda * mu_M  + (1 - lambda) * mu_B
        var_M = lambda * var_M + (1 - lambda) * var_B     (biased variances)
        y = (x - mu_M) / sqrt(var_M + eps) * weight + bias

    with the paper's dynamic momentum (:func:`mbn_lambda`)
    ``lambda_t = rho ** (T / (T - 1) * max(T - t, 0)) - rho ** T``,
    ``rho = min(m / m0, 1) ** (1 / T)``, t the step (``num_batches_tracked``)
    or, with ``steps_per_epoch``, the epoch as in the paper (lambda constant
    within an epoch, T in epochs), m the batch size and m0
    ``ideal_batch_size``: batch normalization at the start, an ever longer
    memory at small batches.  The gradient flows through the current batch's
    share ``1 - lambda`` (the history is a constant).  ``momentum_mean`` and
    ``momentum_var`` (initially 0 and 1) are buffers in the state dict; eval
    mode uses the running statistics, updated from the batch statistics as
    :class:`BatchNorm` does (unbiased variance).  The paper's inference
    statistics average with ``tau = tau0 ** (m / m0)``, tau0 = 0.9: pass
    ``momentum=1 - 0.9 ** (m / m0)``.  The layer's ``last_lambda`` is the
    momentum of the last training step.

    Parameters
    ----------
    num_features : int
        Number of channels C.
    eps : float, default 1e-5
        Added to the variances.
    momentum : float, callable or None, default 0.1
        Running-statistics factor (for eval mode), as :class:`BatchNorm`'s.
    affine : bool, default True
        Learn ``weight`` and ``bias``.
    total_steps : int >= 2
        T, in training steps, or in epochs with ``steps_per_epoch`` (keyword only).
    ideal_batch_size : int, default 32
        The paper's m0 (keyword only).
    steps_per_epoch : int or None, default None
        Training steps per epoch: t and T count epochs, as in the paper;
        None: they count steps (keyword only).
    axis : int, default 1
        The channel axis (keyword only).
    dtype : float32 or float64, default float32
        Dtype of parameters, buffers and inputs (keyword only).

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> mbn = bnfast.MomentumBatchNorm{dim}(4, total_steps=1000)
    >>> sorted(mbn.state_dict())[:3]
    ['bias', 'momentum_mean', 'momentum_var']
    """


class MomentumBatchNorm1d(_MomentumBatchNorm):
    __doc__ = _MBN_DOC.format(shape="(N, C) or (N, C, L)", dim="1d")
    _ranks = (2, 3)


class MomentumBatchNorm2d(_MomentumBatchNorm):
    __doc__ = _MBN_DOC.format(shape="(N, C, H, W)", dim="2d")
    _ranks = (4,)


class MomentumBatchNorm3d(_MomentumBatchNorm):
    __doc__ = _MBN_DOC.format(shape="(N, C, D, H, W)", dim="3d")
    _ranks = (5,)


# ---------------------------------------------------------------------- Cross-iteration BN
class _CrossIterationBatchNorm(_StatisticsNorm):
    """Cross-iteration batch normalization; see CrossIterationBatchNorm1d/2d."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Any = 0.1, affine: bool = True, *,
                 window_size: int = 4, burn_in: int = 100, axis: int = 1, dtype: Any = np.float32) -> None:
        window_size = _int_at_least(window_size, "window_size", 1)
        burn_in = _int_at_least(burn_in, "burn_in", 0)
        super().__init__(num_features, eps, momentum, affine, True, axis=axis, dtype=dtype)
        self.window_size = window_size
        self.burn_in = burn_in
        # (mu, nu, d mu/d W, d nu/d W, W, bias) of earlier iterations, newest first
        self.__dict__["_history"] = []
        self.__dict__["_preceding"] = None

    def _bind_preceding(self, layer: Any) -> None:
        """Called by :class:`~bnfast.nn.Sequential` with the layer run just before."""
        self.__dict__["_preceding"] = layer

    def reset_running_stats(self) -> None:
        """Reset as BatchNorm does, and drop the cross-iteration history."""
        super().reset_running_stats()
        self.__dict__["_history"] = []

    def _source(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """(cols, y as (M, C), W as (C, fan_in), bias) of the preceding layer's last forward."""
        layer = self.__dict__.get("_preceding")
        name = type(self).__name__
        if isinstance(layer, Linear) and x.ndim == 2 and layer._x is not None and layer._x.ndim == 2:
            cols = layer._x
            y2 = x
        elif isinstance(layer, Conv2d) and x.ndim == 4 and layer._cache is not None \
                and layer.axis % 4 == self._axis % 4:
            cols = layer._columns(layer._cache[0])[0]
            # NCHW: (N, C, HW) against cols as (N, HW, fan_in), no transposed copy of x
            y2 = x.reshape(x.shape[0], x.shape[1], -1) if self._axis % 4 == 1 else x.reshape(-1, x.shape[3])
        else:
            raise RuntimeError(
                f"{name} in training must directly follow a Linear (2-D input) or a Conv2d (the same axis) "
                "in a bnfast.nn.Sequential"
            )
        if getattr(layer, "_out_shape", None) != x.shape:
            raise RuntimeError(f"{name}: the input is not the last output of the preceding {type(layer).__name__}")
        w = layer.weight.data
        b = layer._parameters["bias"]
        return cols, y2, w.reshape(w.shape[0], -1), (None if b is None else b.data)

    def _train_forward(self, x, w, b, factor, count):
        step = count if count is not None else 1
        history = self.__dict__["_history"]
        pooled = self.window_size > 1 and step > self.burn_in
        if not pooled:
            y, mean, invstd, stats = self._kernel_forward(x, w, b, factor)
            self.__dict__["_saved"] = (x, mean, invstd, 1.0, None, None, None)
            return y
        cols, y2, weight, bias = self._source(x)
        W = weight.astype(_F64)
        bvec = None if bias is None else bias.astype(_F64)
        k = 1 + len(history)
        prior_mean = np.zeros(self.num_features)
        prior_nu = np.zeros(self.num_features)
        for mu_p, nu_p, dmu_p, dnu_p, W_p, b_p in history:  # newest first, a fixed order
            mu_c, nu_c = _compensated(mu_p, nu_p, dmu_p, dnu_p, W - W_p, None if bvec is None else bvec - b_p)
            prior_mean += mu_c
            prior_nu += np.maximum(nu_c, mu_c * mu_c)
        dmu, dnu = _moment_gradients(cols, y2)
        y, mean, invstd, stats = self._kernel_forward(x, w, b, factor, share=1.0 / k, prior_mean=prior_mean / k,
                                                      prior_var=prior_nu / k, prior_moments=True)
        history.insert(0, (stats[0].copy(), stats[1] + stats[0] * stats[0], dmu, dnu, W.copy(),
                           None if bvec is None else bvec.copy()))
        del history[self.window_size - 1:]
        self.__dict__["_saved"] = (x, mean, invstd, 1.0 / k, stats[2].copy(), None, None)
        return y

    def extra_repr(self) -> str:
        """The argument part of the repr.

        Returns
        -------
        str
            BatchNorm's, then ``window_size`` and ``burn_in``.
        """
        return f"{super().extra_repr()}, window_size={self.window_size}, burn_in={self.burn_in}"


def _moment_gradients(cols: np.ndarray, y2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``d mu_j / d W_j`` (the same for every j: the mean row of ``cols``) and
    ``d nu_j / d W_j = 2/M * sum_i y_ij cols_i`` (one matrix product, like the
    layer's weight gradient), for ``y = cols @ W.T + b`` of M rows; ``y2`` is
    ``y`` as (M, C), or as (N, C, positions) for a channels-first output."""
    m = cols.shape[0]
    dmu = moments(cols, axis=-1).mean  # the column means in float64, at kernel speed (not a float64 sum)
    if y2.ndim == 3:  # (N, C, HW): channels-first output, cols rows in (n, position) order
        prod = (y2 @ cols.reshape(y2.shape[0], y2.shape[2], -1)).sum(axis=0, dtype=_F64)
    else:
        prod = (y2.T @ cols).astype(_F64)
    return dmu, prod * (2.0 / m)


def _compensated(mu: np.ndarray, nu: np.ndarray, dmu: np.ndarray, dnu: np.ndarray, dW: np.ndarray,
                 db: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """First-order Taylor estimate of an earlier iteration's (mu, nu) at the current weights."""
    mu_c = mu + dW @ dmu
    nu_c = nu + np.einsum("cf,cf->c", dnu, dW)
    if db is not None:  # d mu / d b = 1, d nu / d b = 2 mu
        mu_c = mu_c + db
        nu_c = nu_c + 2.0 * mu * db
    return mu_c, nu_c


_CBN_DOC = """Cross-iteration batch normalization of {shape} input (Yao et al. 2021).

    Yao, Cao, Zheng, Huang and Lin, "Cross-Iteration Batch Normalization",
    CVPR 2021.
    For a batch normalization directly after a {layer} in a
    :class:`~bnfast.nn.Sequential`.  In training, after ``burn_in`` steps of
    plain batch normalization, the statistics are pooled over the current
    batch and the previous ``window_size - 1`` ones, each earlier mean
    ``mu`` and second moment ``nu = E[x**2]`` carried to the current weights
    of the {layer} by its first-order Taylor term::

        mu_t-tau(W_t) = mu_t-tau + (d mu / d W)_t-tau . (W_t - W_t-tau)
        mu_bar = mean over tau of mu_t-tau(W_t)
        nu_bar = mean over tau of max(nu_t-tau(W_t), mu_t-tau(W_t)**2)
        var_bar = nu_bar - mu_bar**2

    (and the bias's change, when the layer has one).  The gradients are
    cheap for a linear map ``y = cols @ W.T + b`` (cols the input, or the
    convolution's im2col rows): ``d mu_j / d W_j`` is the mean row of cols,
    the same for every channel, and ``d nu_j / d W_j = 2/M sum_i y_ij cols_i``
    -- one matrix product, the cost of the layer's weight gradient.  As in
    the paper's reference code, the earlier statistics are constants in
    backward: the gradient flows through the current batch's share ``1/k``
    of the pooled statistics.  The running statistics (eval mode) are
    updated with the batch statistics as :class:`BatchNorm` does.  The
    history is transient (not in the state dict) and dropped by
    ``reset_running_stats``.

    Parameters
    ----------
    num_features : int
        Number of channels C.
    eps : float, default 1e-5
        Added to the variances.
    momentum : float, callable or None, default 0.1
        Running-statistics factor, as :class:`BatchNorm`'s.
    affine : bool, default True
        Learn ``weight`` and ``bias``.
    window_size : int >= 1, default 4
        The paper's k: iterations pooled, the current one included (keyword only).
    burn_in : int >= 0, default 100
        Training steps of plain batch normalization first (keyword only).
    axis : int, default 1
        The channel axis (keyword only); that of the preceding layer.
    dtype : float32 or float64, default float32
        Dtype of parameters, buffers and inputs (keyword only).

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> from bnfast.nn import Sequential, {layer}
    >>> model = Sequential({example}, bnfast.CrossIterationBatchNorm{dim}(4, burn_in=0))
    >>> for step in range(3):
    ...     y = model(np.random.default_rng(step).standard_normal({input}).astype(np.float32))
    """


class CrossIterationBatchNorm1d(_CrossIterationBatchNorm):
    __doc__ = _CBN_DOC.format(shape="(N, C)", layer="Linear", dim="1d", example="Linear(3, 4, rng=0)",
                              input="(8, 3)")
    _ranks = (2,)


class CrossIterationBatchNorm2d(_CrossIterationBatchNorm):
    __doc__ = _CBN_DOC.format(shape="(N, C, H, W)", layer="Conv2d", dim="2d",
                              example="Conv2d(2, 4, 3, rng=0)", input="(2, 2, 5, 5)")
    _ranks = (4,)

