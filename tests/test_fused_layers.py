"""Layers on the fused ops: BatchNorm*(activation=, inplace=), Sequential's fusion, Residual."""

from __future__ import annotations

import numpy as np
import pytest

from bnfast import nn

ACT_LAYERS = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.1), "elu": nn.ELU}


def _pair(act, axis, seed=0):
    """(fused, unfused) models with the same weights: the nested Sequential keeps BN and act apart."""
    def make(fused):
        conv = nn.Conv2d(3, 4, 3, padding=1, axis=axis, rng=seed)
        bn = nn.BatchNorm2d(4, axis=axis)
        bn.weight[...] = np.array([0.5, -1.5, 2.0, 1.0], np.float32)
        bn.bias[...] = np.array([0.1, -0.2, 0.3, 0.0], np.float32)
        tail = nn.Conv2d(4, 2, 1, axis=axis, rng=seed + 1)
        if fused:
            return nn.Sequential(conv, bn, ACT_LAYERS[act](), tail)
        return nn.Sequential(nn.Sequential(conv, bn), ACT_LAYERS[act](), tail)
    return make(True), make(False)


def _grads(model):
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("act", list(ACT_LAYERS))
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("training", [True, False])
def test_sequential_fusion_matches_unfused(act, axis, training):
    fused, plain = _pair(act, axis)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, 6, 6) if axis == 1 else (4, 6, 6, 3)).astype(np.float32)
    for m in (fused, plain):
        m.train(training)
    y1, y2 = fused(x), plain(x)
    np.testing.assert_allclose(y1, y2, rtol=0, atol=1e-5)
    g = rng.standard_normal(y1.shape).astype(np.float32)
    np.testing.assert_allclose(fused.backward(g), plain.backward(g), rtol=0, atol=1e-5)
    for a, b in zip(_grads(fused), _grads(plain)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    bn1, bn2 = fused[1], plain[0][1]
    np.testing.assert_allclose(bn1.running_mean, bn2.running_mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(bn1.running_var, bn2.running_var, rtol=0, atol=1e-6)
    assert bn1.__dict__["_fused"] is not None  # the fused path ran


@pytest.mark.parametrize("act", ["leaky_relu", "elu", "identity"])
@pytest.mark.parametrize("axis", [1, -1])
def test_inplace_layer_matches_batch_norm_then_activation(act, axis):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 5, 3, 3) if axis == 1 else (4, 3, 3, 5)).astype(np.float64)
    fused = nn.BatchNorm2d(5, axis=axis, dtype=np.float64, activation=act, negative_slope=0.2, inplace=True)
    bn = nn.BatchNorm2d(5, axis=axis, dtype=np.float64)
    post = {"leaky_relu": nn.LeakyReLU(0.2), "elu": nn.ELU(), "identity": None}[act]
    w, b = rng.uniform(0.5, 2, 5), rng.standard_normal(5)
    for m in (fused, bn):
        m.weight[...] = w
        m.bias[...] = b
    ref_y = bn(x)
    ref_y = post(ref_y) if post is not None else ref_y
    xin = x.copy()
    y = fused(xin)
    assert y is xin  # written over its input
    assert fused._saved[0] is None  # the input is not kept
    np.testing.assert_allclose(y, ref_y, rtol=0, atol=1e-12)
    g = rng.standard_normal(x.shape)
    gx_ref = bn.backward(post.backward(g) if post is not None else g)
    np.testing.assert_allclose(fused.backward(g), gx_ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(fused.weight.grad, bn.weight.grad, rtol=0, atol=1e-10)
    np.testing.assert_allclose(fused.bias.grad, bn.bias.grad, rtol=0, atol=1e-10)
    np.testing.assert_allclose(fused.running_var, bn.running_var, rtol=0, atol=1e-12)


def test_residual_block_fused_matches_composition():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 4, 5, 5)).astype(np.float64)

    def body(seed):
        return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, rng=seed), nn.BatchNorm2d(4))

    block = nn.Residual(body(0), shortcut=nn.Conv2d(4, 4, 1, rng=5), activation="relu")
    ref_body, ref_short = body(0), nn.Conv2d(4, 4, 1, rng=5)
    x32 = x.astype(np.float32)
    y = block(x32)
    v = ref_body(x32) + ref_short(x32)
    np.testing.assert_allclose(y, np.maximum(v, 0), rtol=0, atol=1e-5)
    g = rng.standard_normal(y.shape).astype(np.float32)
    gv = g * (v > 0)
    gx_ref = ref_body.backward(gv) + ref_short.backward(gv)
    np.testing.assert_allclose(block.backward(g), gx_ref, rtol=0, atol=1e-4)
    for a, b in zip(block.parameters(), list(ref_body.parameters()) + list(ref_short.parameters())):
        np.testing.assert_allclose(a.grad, b.grad, rtol=0, atol=1e-3)


def test_residual_without_norm_is_unfused_composition():
    block = nn.Residual(nn.Conv2d(2, 2, 1, rng=0), activation="leaky_relu", negative_slope=0.1)
    x = np.random.default_rng(4).standard_normal((2, 2, 3, 3)).astype(np.float32)
    conv = nn.Conv2d(2, 2, 1, rng=0)
    v = conv(x) + x
    np.testing.assert_allclose(block(x), np.where(v < 0, 0.1 * v, v), rtol=0, atol=1e-6)
    g = np.ones_like(v)
    gv = np.where(v > 0, g, 0.1 * g)
    np.testing.assert_allclose(block.backward(g), conv.backward(gv) + gv, rtol=0, atol=1e-6)


def test_layer_bad_arguments():
    with pytest.raises(ValueError, match="inplace=True needs an invertible activation"):
        nn.BatchNorm2d(3, activation="relu", inplace=True)
    with pytest.raises(ValueError, match="inplace=True needs an invertible"):
        nn.BatchNorm2d(3, activation="leaky_relu", negative_slope=0.0, inplace=True)
    with pytest.raises(ValueError, match="unknown activation"):
        nn.BatchNorm2d(3, activation="tanh")
    with pytest.raises(TypeError, match="inplace must be True or False"):
        nn.BatchNorm2d(3, inplace="yes")
    with pytest.raises(ValueError, match="unknown activation"):
        nn.Residual(nn.ReLU(), activation="gelu")


def test_failed_fused_forward_leaves_layer_state_untouched():
    bn = nn.BatchNorm2d(3, activation="leaky_relu", inplace=True)
    x = np.random.default_rng(5).standard_normal((4, 3, 2, 2)).astype(np.float32)
    with pytest.raises(ValueError):
        bn(x[:1, :, :1, :1])  # one value per channel
    np.testing.assert_array_equal(bn.running_mean, 0)
    np.testing.assert_array_equal(bn.running_var, 1)
    assert int(bn.num_batches_tracked) == 0


def test_eval_mode_fused_layer_keeps_input_and_matches():
    bn = nn.BatchNorm2d(3, activation="elu", inplace=True).eval()
    plain, post = nn.BatchNorm2d(3).eval(), nn.ELU()
    for m in (bn, plain):
        m.running_mean[...] = [0.1, -0.2, 0.3]
        m.running_var[...] = [1.5, 0.5, 2.0]
    x = np.random.default_rng(6).standard_normal((2, 3, 4, 4)).astype(np.float32)
    x0 = x.copy()
    y = bn(x)
    np.testing.assert_array_equal(x, x0)  # eval mode is not in place
    np.testing.assert_allclose(y, post(plain(x0)), rtol=0, atol=1e-6)
    g = np.ones_like(y)
    np.testing.assert_allclose(bn.backward(g), plain.backward(post.backward(g)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: nn.BatchRenorm1d(6, momentum=0.1),
    lambda: nn.MomentumBatchNorm1d(6, total_steps=10),
    lambda: nn.BatchNorm1d(6, virtual_batch_size=4),
])
def test_sequential_keeps_the_activation_of_layers_that_do_not_fuse(make):
    """Variants and ghost batches compute their own forward: Sequential must not fold the ReLU into them."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 6)).astype(np.float32)
    alone, seq_norm = make(), make()
    seq = nn.Sequential(seq_norm, nn.ReLU())
    y = seq(x)
    np.testing.assert_array_equal(y, np.maximum(alone(x), 0))
    g = rng.standard_normal(y.shape).astype(np.float32)
    gx = seq.backward(g)
    np.testing.assert_array_equal(gx, alone.backward(g * (y > 0)))


def test_ghost_batches_refuse_a_fused_activation():
    with pytest.raises(ValueError, match="virtual_batch_size"):
        nn.BatchNorm2d(4, virtual_batch_size=2, activation="relu")
    with pytest.raises(ValueError, match="virtual_batch_size"):
        nn.BatchNorm2d(4, virtual_batch_size=2, inplace=True)


@pytest.mark.parametrize("kernel,axis", [(1, -1), (3, 1)])
def test_inplace_training_step_retains_less_activation_memory(kernel, axis):
    """Issue 16's memory bar, measured with tracemalloc (deterministic, not a
    timing): a training step of 4 x Conv-BN-LeakyReLU retains at least 30%
    less memory fused in place than unfused, 3x3 convolutions included (the
    convolution keeps its input, not its im2col matrix)."""
    from bnfast._bench_fused import training_step_memory

    shape = (4, 16, 16, 16)
    unfused = training_step_memory("leaky_unfused", shape, kernel, axis)
    inplace = training_step_memory("leaky_inplace", shape, kernel, axis)
    assert inplace["retained"] <= 0.7 * unfused["retained"], (unfused, inplace)
    assert inplace["peak"] < unfused["peak"]


def test_conv_keeps_its_input_not_the_im2col_matrix():
    conv = nn.Conv2d(4, 8, 3, padding=1, rng=0)
    x = np.random.default_rng(0).standard_normal((2, 4, 9, 9)).astype(np.float32)
    conv(x)
    assert conv._cache[0] is x
    assert all(a.nbytes <= x.nbytes for a in conv._cache if isinstance(a, np.ndarray))
