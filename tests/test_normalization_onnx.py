"""ONNX normalization operators through bnfast (skipped when onnx is missing).

One-node models built with ``onnx.helper`` and run by onnx's reference
evaluator (``onnx.reference.ReferenceEvaluator``), against bnfast with the
operator's attributes mapped onto its arguments:

- LayerNormalization (opset 17): ``axis=a`` -> ``normalized_shape=x.shape[a:]``
  (negative axes too, and axis=1 of a 4-D input); outputs Y, Mean and
  InvStdDev against `layer_norm_forward`'s y, mean and invstd, shapes included.
- GroupNormalization (opset 21, scale and bias per channel) -> `group_norm`;
  float64 inputs with ``stash_type=DOUBLE`` (the default, 1, computes a
  double input's statistics in float32).
- InstanceNormalization (opsets 6 and 22) -> `instance_norm`.
- RMSNormalization (opset 23) -> `rms_norm`.

ONNX's ``epsilon`` is a float32 attribute, so bnfast gets that float32 value.
Channels-last inputs (bnfast's ``axis=-1``) are compared with the operator
on the channels-first array, transposed back.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

import bnfast  # noqa: E402

from _normalization_cases import assert_close  # noqa: E402

DTYPES = (np.float32, np.float64)
ELEM = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE}


def run_op(op, opset, inputs, out_shapes=None, **attrs):
    """Run one ``op`` node (opset ``opset``) on ``inputs`` (arrays; a trailing
    None is an omitted optional input) with onnx's reference evaluator;
    ``out_shapes`` declares the outputs (default: one of the input's shape)."""
    while inputs and inputs[-1] is None:
        inputs = inputs[:-1]
    elem = ELEM[inputs[0].dtype]
    out_shapes = [inputs[0].shape] if out_shapes is None else out_shapes
    names = [f"in{i}" for i in range(len(inputs))]
    outs = [f"out{i}" for i in range(len(out_shapes))]
    graph = helper.make_graph(
        [helper.make_node(op, names, outs, **attrs)],
        f"{op}_graph",
        [helper.make_tensor_value_info(n, ELEM[a.dtype], a.shape) for n, a in zip(names, inputs)],
        [helper.make_tensor_value_info(n, elem, shape) for n, shape in zip(outs, out_shapes)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return ReferenceEvaluator(model).run(None, dict(zip(names, inputs)))


def onnx_eps(eps):
    """The value an ONNX float attribute holds."""
    return float(np.float32(eps))


def _rng(seed):
    return np.random.default_rng(seed)


def _y_scale(w, y):
    """Y's scale: max(1, |Y|, |weight|)."""
    wmax = 1.0 if w is None else max(1.0, float(np.max(np.abs(w))))
    return max(1.0, float(np.max(np.abs(y))), wmax)


def _has_schema(op, version):
    try:
        schema = onnx.defs.get_schema(op, version)
    except Exception:  # onnx.defs.SchemaError: unknown operator or version
        return False
    return schema.since_version <= version


def _to_channels_last(a):
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


# --------------------------------------------------------- LayerNormalization

LAYER = [
    ((3, 4, 5), -1), ((3, 4, 5), -2), ((3, 4, 5), -3), ((3, 4, 5), 0), ((3, 4, 5), 1), ((3, 4, 5), 2),
    ((2, 3, 4, 5), 1), ((2, 3, 4, 5), -1), ((2, 3, 4, 5), -3), ((2, 3, 4, 5), 3),
    ((6, 16), 1), ((6, 16), -1),
]


@pytest.mark.parametrize("shape,axis", LAYER, ids=[f"{s}-axis{a}" for s, a in LAYER])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("epsilon", [None, 1e-3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_layer_normalization(shape, axis, dtype, epsilon, with_bias):
    rng = _rng(0)
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    normalized = x.shape[axis:]
    scale = rng.uniform(-2, 2, normalized).astype(dtype)
    bias = rng.standard_normal(normalized).astype(dtype) if with_bias else None
    attrs = {"axis": axis}
    if epsilon is not None:
        attrs["epsilon"] = epsilon
    stat = x.shape[: x.ndim - len(normalized)] + (1,) * len(normalized)
    y_o, mean_o, inv_o = run_op("LayerNormalization", 17, [x, scale, bias], [x.shape, stat, stat], **attrs)
    eps = onnx_eps(1e-5 if epsilon is None else epsilon)  # the operator's default epsilon is 1e-5
    y, mean, inv = bnfast.layer_norm_forward(x, normalized, scale, bias, eps)
    assert y.shape == y_o.shape and mean.shape == mean_o.shape and inv.shape == inv_o.shape
    assert y.dtype == y_o.dtype and mean.dtype == mean_o.dtype and inv.dtype == inv_o.dtype
    assert_close(y, y_o, dtype, scale=_y_scale(scale, y_o), err_msg="Y")
    assert_close(mean, mean_o, dtype, err_msg="Mean")
    assert_close(inv, inv_o, dtype, err_msg="InvStdDev")
    np.testing.assert_array_equal(bnfast.layer_norm(x, normalized, scale, bias, eps), y)


def test_layer_normalization_default_attributes():
    """No attributes: axis -1, epsilon 1e-5; Scale only."""
    rng = _rng(1)
    x = rng.standard_normal((4, 3, 7))
    scale = rng.uniform(0.5, 2, 7)
    y_o, mean_o, inv_o = run_op("LayerNormalization", 17, [x, scale], [x.shape, (4, 3, 1), (4, 3, 1)])
    y, mean, inv = bnfast.layer_norm_forward(x, x.shape[-1:], scale, None, onnx_eps(1e-5))
    assert_close(y, y_o, np.float64)
    assert_close(mean, mean_o, np.float64)
    assert_close(inv, inv_o, np.float64)


# --------------------------------------------------------- GroupNormalization

GROUP = [
    ((2, 6, 3, 4), 1), ((2, 6, 3, 4), 2), ((2, 6, 3, 4), 3), ((2, 6, 3, 4), 6),
    ((3, 4, 5), 2), ((2, 8, 2, 3, 2), 4), ((4, 16, 8, 8), 4),
]


@pytest.mark.parametrize("shape,groups", GROUP, ids=[f"{s}-G{g}" for s, g in GROUP])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("epsilon", [None, 1e-2])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_group_normalization(shape, groups, dtype, epsilon, layout):
    rng = _rng(2)
    x = (rng.standard_normal(shape) - 0.5).astype(dtype)
    c = shape[1]
    scale = rng.uniform(-2, 2, c).astype(dtype)
    bias = rng.standard_normal(c).astype(dtype)
    attrs = {"num_groups": groups}
    if dtype == np.float64:  # stage one (the statistics) in double, not the default float32
        attrs["stash_type"] = TensorProto.DOUBLE
    if epsilon is not None:
        attrs["epsilon"] = epsilon
    (y_o,) = run_op("GroupNormalization", 21, [x, scale, bias], **attrs)
    eps = onnx_eps(1e-5 if epsilon is None else epsilon)
    if layout == "channels_first":
        y = bnfast.group_norm(x, groups, scale, bias, eps)
    else:
        y = np.moveaxis(bnfast.group_norm(_to_channels_last(x), groups, scale, bias, eps, axis=-1), -1, 1)
    assert y.shape == y_o.shape and y.dtype == y_o.dtype
    assert_close(y, y_o, dtype, scale=_y_scale(scale, y_o), err_msg="Y")


# ------------------------------------------------------ InstanceNormalization

INSTANCE = [(2, 3, 5), (2, 3, 4, 5), (2, 4, 2, 3, 2), (1, 8, 6, 6)]


@pytest.mark.parametrize("shape", INSTANCE, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("epsilon", [None, 1e-3])
@pytest.mark.parametrize("opset", [6, 22])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_instance_normalization(shape, dtype, epsilon, opset, layout):
    if not _has_schema("InstanceNormalization", opset):
        pytest.skip(f"this onnx has no InstanceNormalization for opset {opset}")
    rng = _rng(3)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    c = shape[1]
    scale = rng.uniform(-2, 2, c).astype(dtype)
    bias = rng.standard_normal(c).astype(dtype)
    attrs = {} if epsilon is None else {"epsilon": epsilon}
    (y_o,) = run_op("InstanceNormalization", opset, [x, scale, bias], **attrs)
    eps = onnx_eps(1e-5 if epsilon is None else epsilon)
    if layout == "channels_first":
        y = bnfast.instance_norm(x, weight=scale, bias=bias, eps=eps)
    else:
        y = np.moveaxis(bnfast.instance_norm(_to_channels_last(x), weight=scale, bias=bias, eps=eps, axis=-1),
                        -1, 1)
    assert y.shape == y_o.shape and y.dtype == y_o.dtype
    assert_close(y, y_o, dtype, scale=_y_scale(scale, y_o), err_msg="output")


def test_instance_normalization_unit_affine_is_no_affine():
    rng = _rng(4)
    x = rng.standard_normal((2, 3, 4, 5))
    (y_o,) = run_op("InstanceNormalization", 6, [x, np.ones(3), np.zeros(3)])
    assert_close(bnfast.instance_norm(x, eps=onnx_eps(1e-5)), y_o, np.float64)


# ---------------------------------------------------------- RMSNormalization

RMS = [((3, 4, 5), -1), ((3, 4, 5), -2), ((3, 4, 5), 1), ((2, 3, 4, 5), 1), ((2, 3, 4, 5), -1), ((8, 32), -1)]


@pytest.mark.parametrize("shape,axis", RMS, ids=[f"{s}-axis{a}" for s, a in RMS])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("epsilon", [None, 1e-6])
def test_rms_normalization(shape, axis, dtype, epsilon):
    if not _has_schema("RMSNormalization", 23):
        pytest.skip(f"onnx {onnx.__version__} has no RMSNormalization (opset 23)")
    rng = _rng(5)
    x = (rng.standard_normal(shape) + 0.5).astype(dtype)
    normalized = x.shape[axis:]
    scale = rng.uniform(-2, 2, normalized).astype(dtype)
    attrs = {"axis": axis}
    if epsilon is not None:
        attrs["epsilon"] = epsilon
    (y_o,) = run_op("RMSNormalization", 23, [x, scale], **attrs)
    # the operator's default epsilon is 1e-5 (bnfast's default is the machine epsilon)
    eps = onnx_eps(1e-5 if epsilon is None else epsilon)
    y = bnfast.rms_norm(x, normalized, scale, eps)
    assert y.shape == y_o.shape and y.dtype == y_o.dtype
    assert_close(y, y_o, dtype, scale=_y_scale(scale, y_o), err_msg="Y")
