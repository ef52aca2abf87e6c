"""Transposed and depthwise convolution, group and layer normalisation against external oracles:
Keras' Conv2DTranspose ("valid"/"same", with its own weights) and tf.nn.depthwise_conv2d (with dilation)
from TensorFlow; torch.nn.functional.conv_transpose2d/1d (padding, output_padding, dilation), group_norm
and layer_norm from PyTorch, forward and gradients (torch autograd). Both `jaxcnn.ops` and
`jaxcnn.reference` are checked, the fast ops under the CPU default lowering and under "xla"."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import ops, reference

from helpers import assert_close, import_tensorflow, import_torch

pytestmark = pytest.mark.oracle

_IMPLS = [(ops, "auto"), (ops, "xla"), (reference, "auto")]
_NORM_IMPLS = [(ops, "auto"), (reference, "auto")]


@pytest.fixture(scope="module")
def tf():
  tf = import_tensorflow()
  tf.config.set_visible_devices([], "GPU")
  return tf


@pytest.fixture(scope="module")
def keras(tf):
  os.environ.setdefault("KERAS_BACKEND", "tensorflow")
  keras = pytest.importorskip("keras")
  if keras.backend.backend() != "tensorflow":
    pytest.skip(f"Keras runs on {keras.backend.backend()}, these checks use the TensorFlow backend")
  return keras


@pytest.fixture(scope="module")
def torch():
  torch = import_torch()
  torch.set_num_threads(1)
  return torch


def _normal(seed: int, shape) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _values_and_grads(name, args, ct, impls=_IMPLS, **kwargs):
  """[(out, grads of sum(out * ct) w.r.t. every array arg)] per (module, lowering) of `impls`, all in one
  jitted program (the lowering is read at trace time, so each is traced under its own): one compile."""

  def one(module, lowering, *a):
    def loss(*a):
      out = getattr(module, name)(*a, **kwargs)
      return jnp.sum(out * ct), out

    with ops.conv_lowering(lowering):
      (_, out), grads = jax.value_and_grad(loss, argnums=tuple(range(len(a))), has_aux=True)(*a)
    return out, grads

  results = jax.jit(lambda *a: [one(module, lowering, *a) for module, lowering in impls])(*args)
  return [(np.asarray(out), [np.asarray(g) for g in grads]) for out, grads in results]


# ---- Keras Conv2DTranspose: "valid" / "same" with Keras' weights -----------------------------------------

# (H, W, kernel, strides, padding, output_padding): odd/even sizes, even kernels, strides 1-3, Keras'
# output_padding. (TensorFlow's CPU kernel has no dilated transposed convolution; PyTorch covers it.)
_KERAS_CASES = [
    (5, 6, (3, 3), 2, "same", None), (4, 5, (4, 3), 2, "same", None), (5, 4, (3, 2), (2, 3), "valid", None),
    (5, 5, (3, 3), 3, "same", 1), (4, 5, (3, 4), 2, "valid", 1),
]


@pytest.mark.parametrize("h, w_, kernel, strides, padding, output_padding", _KERAS_CASES)
def test_conv2d_transpose_matches_keras(keras, tf, h, w_, kernel, strides, padding, output_padding):
  x = _normal(0, (2, h, w_, 3))
  layer = keras.layers.Conv2DTranspose(4, kernel, strides=strides, padding=padding,
                                       output_padding=output_padding)
  xt = tf.constant(x)
  with tf.GradientTape() as tape:
    tape.watch(xt)
    expected = layer(xt)
    ct = tf.constant(_normal(1, expected.shape))
    loss = tf.reduce_sum(expected * ct)
  kernel_w, bias = layer.weights
  assert tuple(kernel_w.shape) == (*kernel, 4, 3)  # (kh, kw, filters, in): the layout jaxcnn takes
  dx, dk = tape.gradient(loss, [xt, kernel_w])
  weights = [np.asarray(kernel_w), np.asarray(bias)]
  for out, (gx, gw, _) in _values_and_grads("conv2d_transpose", (x, *weights), ct.numpy(), strides=strides,
                                            padding=padding, output_padding=output_padding):
    assert out.shape == tuple(expected.shape)
    assert_close(out, expected.numpy())
    assert_close(gx, dx.numpy())
    assert_close(gw, dk.numpy())


# ---- tf.nn.depthwise_conv2d, with dilation -----------------------------------------------------------

@pytest.mark.parametrize("h, w_, kernel, multiplier, strides, dilation, padding", [
    (7, 6, (3, 3), 1, 1, 2, "SAME"), (8, 7, (3, 2), 2, 1, (2, 3), "VALID"), (7, 8, (2, 4), 2, 2, 1, "SAME")])
def test_depthwise_conv2d_matches_tensorflow(tf, h, w_, kernel, multiplier, strides, dilation, padding):
  x = _normal(2, (2, h, w_, 3))
  filt = _normal(3, (*kernel, 3, multiplier))
  rate = (dilation, dilation) if isinstance(dilation, int) else dilation
  xt, ft = tf.constant(x), tf.constant(filt)
  with tf.GradientTape() as tape:
    tape.watch([xt, ft])
    expected = tf.nn.depthwise_conv2d(xt, ft, strides=[1, strides, strides, 1], padding=padding,
                                      dilations=rate)
    ct = tf.constant(_normal(4, expected.shape))
    loss = tf.reduce_sum(expected * ct)
  dx, df = tape.gradient(loss, [xt, ft])
  for out, (gx, gw) in _values_and_grads("depthwise_conv2d", (x, filt), ct.numpy(), strides=strides,
                                         padding=padding.lower(), dilation=dilation):
    assert_close(out, expected.numpy())
    assert_close(gx, dx.numpy())
    assert_close(gw, df.numpy())


# ---- PyTorch: ConvTranspose2d / 1d, padding and output_padding, gradients --------------------------------

def _torch_grads(torch, fn, arrays, ct):
  tensors = [torch.from_numpy(np.ascontiguousarray(a)).requires_grad_(True) for a in arrays]
  out = fn(*tensors)
  grads = torch.autograd.grad((out * torch.from_numpy(np.ascontiguousarray(ct))).sum(), tensors)
  return out.detach().numpy(), [g.numpy() for g in grads]


@pytest.mark.parametrize("kernel, stride, padding, output_padding, dilation", [
    ((3, 3), 2, 1, 1, 1), ((4, 3), (2, 3), (1, 2), (0, 2), 1), ((3, 3), 1, 2, 1, 2),
    ((2, 3), 3, (0, 1), (2, 1), (2, 1))])
def test_conv2d_transpose_matches_torch(torch, kernel, stride, padding, output_padding, dilation):
  F = torch.nn.functional
  x = _normal(5, (2, 5, 4, 3))
  w = _normal(6, (*kernel, 4, 3)) / 3.0  # (kh, kw, O, C); torch's weight is (C, O, kh, kw)
  b = _normal(7, (4,))
  probe = F.conv_transpose2d(torch.zeros(2, 3, 5, 4), torch.zeros(3, 4, *kernel), stride=stride,
                             padding=padding, output_padding=output_padding, dilation=dilation)
  ct_nchw = _normal(8, tuple(probe.shape))
  expected, (dx, dw, db) = _torch_grads(
      torch, lambda x, w, b: F.conv_transpose2d(x, w, b, stride=stride, padding=padding,
                                                output_padding=output_padding, dilation=dilation),
      [x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1), b], ct_nchw)
  ct = ct_nchw.transpose(0, 2, 3, 1)
  for out, (gx, gw, gb) in _values_and_grads("conv2d_transpose", (x, w, b), ct, strides=stride,
                                             padding=padding, output_padding=output_padding, dilation=dilation):
    assert_close(out, expected.transpose(0, 2, 3, 1))
    assert_close(gx, dx.transpose(0, 2, 3, 1))
    assert_close(gw, dw.transpose(2, 3, 1, 0))
    assert_close(gb, db)


@pytest.mark.parametrize("k, stride, padding, output_padding, dilation", [
    (4, 3, 2, 2, 2), (5, 2, 4, 0, 1)])
def test_conv1d_transpose_matches_torch(torch, k, stride, padding, output_padding, dilation):
  F = torch.nn.functional
  x = _normal(9, (2, 6, 3))
  w = _normal(10, (k, 4, 3)) / 2.0
  b = _normal(11, (4,))
  probe = F.conv_transpose1d(torch.zeros(2, 3, 6), torch.zeros(3, 4, k), stride=stride, padding=padding,
                             output_padding=output_padding, dilation=dilation)
  ct_ncl = _normal(12, tuple(probe.shape))
  expected, (dx, dw, db) = _torch_grads(
      torch, lambda x, w, b: F.conv_transpose1d(x, w, b, stride=stride, padding=padding,
                                                output_padding=output_padding, dilation=dilation),
      [x.transpose(0, 2, 1), w.transpose(2, 1, 0), b], ct_ncl)
  for out, (gx, gw, gb) in _values_and_grads("conv1d_transpose", (x, w, b), ct_ncl.transpose(0, 2, 1),
                                             strides=stride, padding=padding, output_padding=output_padding,
                                             dilation=dilation):
    assert_close(out, expected.transpose(0, 2, 1))
    assert_close(gx, dx.transpose(0, 2, 1))
    assert_close(gw, dw.transpose(2, 1, 0))
    assert_close(gb, db)


# ---- PyTorch: group_norm, layer_norm -------------------------------------------------------------------

@pytest.mark.parametrize("shape, groups, epsilon", [((2, 4, 5, 6), 3, 1e-5), ((3, 7, 8), 2, 1e-3)])
def test_group_norm_matches_torch(torch, shape, groups, epsilon):
  F = torch.nn.functional
  x = _normal(13, shape) * 3.0 + 1.0
  scale, bias = _normal(14, shape[-1:]), _normal(15, shape[-1:])
  ct = _normal(16, shape)
  to_torch = lambda a: np.moveaxis(a, -1, 1)  # noqa: E731  channels last -> channels first
  expected, (dx, ds, db) = _torch_grads(
      torch, lambda x, s, b: F.group_norm(x, groups, s, b, eps=epsilon), [to_torch(x), scale, bias],
      to_torch(ct))
  for out, (gx, gs, gb) in _values_and_grads("group_norm", (x, scale, bias), ct, impls=_NORM_IMPLS,
                                             groups=groups, epsilon=epsilon):
    assert_close(out, np.moveaxis(expected, 1, -1))
    assert_close(gx, np.moveaxis(dx, 1, -1))
    assert_close(gs, ds)
    assert_close(gb, db)


@pytest.mark.parametrize("shape, epsilon", [((2, 3, 4, 6), 1e-5), ((16,), 1e-3)])
def test_layer_norm_matches_torch(torch, shape, epsilon):
  F = torch.nn.functional
  x = _normal(17, shape) * 2.0 - 1.0
  scale, bias = _normal(18, shape[-1:]), _normal(19, shape[-1:])
  ct = _normal(20, shape)
  expected, (dx, ds, db) = _torch_grads(
      torch, lambda x, s, b: F.layer_norm(x, shape[-1:], s, b, eps=epsilon), [x, scale, bias], ct)
  for out, (gx, gs, gb) in _values_and_grads("layer_norm", (x, scale, bias), ct, impls=_NORM_IMPLS,
                                             epsilon=epsilon):
    assert_close(out, expected)
    assert_close(gx, dx)
    assert_close(gs, ds)
    assert_close(gb, db)
