"""Convolutions against external oracles: TensorFlow for "same" padding, PyTorch for explicit padding,
dilation and groups (forward, and input/weight/bias gradients from torch autograd)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import ops, reference

from helpers import assert_close, import_tensorflow, import_torch

pytestmark = pytest.mark.oracle

LOWERINGS = ("xla", "im2col", "rows")


@pytest.fixture(scope="module")
def tf():
  """TensorFlow on CPU only, imported on first use (the import alone takes seconds)."""
  tf = import_tensorflow()
  tf.config.set_visible_devices([], "GPU")
  return tf


@pytest.fixture(scope="module")
def torch():
  torch = import_torch()
  torch.set_num_threads(1)  # tiny inputs; extra threads only contend with the other test workers
  return torch


def _normal(seed: int, shape) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _ours(conv, lowering, x, w, b=None, **kwargs):
  """conv jitted (one compile, not one per primitive) and traced under `lowering`, as a NumPy array."""
  with ops.conv_lowering(lowering):
    return np.asarray(jax.jit(lambda x, w, b: conv(x, w, b, **kwargs))(x, w, b))


# ---- TensorFlow: "same" padding ---------------------------------------------------------------------

# (H, W, kernel, stride, dilation): even and odd sizes, even kernels (odd total padding -> the extra on
# the bottom/right), strides 1-2, one dilated case (TensorFlow allows dilation only with stride 1).
_SAME_2D = [(6, 7, 3, 1, 1), (7, 6, 4, 1, 1), (6, 6, 3, 2, 1), (7, 7, 2, 2, 1), (5, 8, 4, 2, 1),
            (7, 6, 3, 1, 2)]


@pytest.mark.parametrize("h, w_, k, stride, dilation", _SAME_2D)
def test_conv2d_same_matches_tensorflow(tf, h, w_, k, stride, dilation):
  x = _normal(0, (2, h, w_, 3))
  w = _normal(1, (k, k + 1 if k < 4 else k, 3, 4))  # non-square kernels too
  expected = tf.nn.conv2d(x, w, strides=stride, padding="SAME", dilations=dilation).numpy()
  for lowering in LOWERINGS:
    out = _ours(ops.conv2d, lowering, x, w, strides=stride, padding="same", dilation=dilation)
    assert out.shape == expected.shape
    assert_close(out, expected)
  assert_close(_ours(reference.conv2d, "auto", x, w, strides=stride, padding="same", dilation=dilation),
               expected)


@pytest.mark.parametrize("length, k, stride", [(9, 3, 1), (10, 4, 1), (10, 3, 2), (9, 4, 2)])
def test_conv1d_same_matches_tensorflow(tf, length, k, stride):
  x = _normal(2, (2, length, 3))
  w = _normal(3, (k, 3, 5))
  expected = tf.nn.conv1d(x, w, stride=stride, padding="SAME").numpy()
  for lowering in LOWERINGS:
    assert_close(_ours(ops.conv1d, lowering, x, w, strides=stride, padding="same"), expected)
  assert_close(_ours(reference.conv1d, "auto", x, w, strides=stride, padding="same"), expected)


def test_depthwise_same_matches_tensorflow(tf):
  # tf.nn.depthwise_conv2d: filter (kh, kw, C, multiplier) -> output channel c * multiplier + m, which is
  # our grouped kernel (kh, kw, 1, C * multiplier) with groups = C.
  x = _normal(4, (1, 7, 6, 3))
  filt = _normal(5, (3, 3, 3, 2))
  expected = tf.nn.depthwise_conv2d(x, filt, strides=[1, 2, 2, 1], padding="SAME").numpy()
  w = filt.reshape(3, 3, 1, 6)
  for lowering in LOWERINGS:
    assert_close(_ours(ops.conv2d, lowering, x, w, strides=2, padding="same", groups=3), expected)


# ---- PyTorch: explicit padding, dilation, groups; forward and autograd ------------------------------

# (spatial, kernel, stride, padding, dilation, groups, C, O); padding in our form.
_TORCH_2D = [
    ((7, 6), (3, 3), 1, 1, 1, 1, 3, 4),
    ((8, 7), (3, 2), 2, ((1, 2), (0, 1)), 1, 1, 3, 5),
    ((9, 9), (3, 3), 1, 2, 2, 1, 2, 3),
    ((7, 8), (2, 3), (2, 1), ((2, 0), (1, 1)), (1, 2), 2, 4, 6),
    ((6, 6), (3, 3), 2, 1, 1, 4, 4, 8),   # depthwise, multiplier 2
    ((5, 7), (1, 1), 3, 0, 1, 1, 3, 2),
]


def _torch_conv(torch, x, w, b, stride, padding, dilation, groups, n):
  """torch conv on our layouts: NHWC -> NCHW, HWIO -> OIHW; asymmetric padding through F.pad."""
  F = torch.nn.functional
  xt = torch.tensor(x).permute(0, n + 1, *range(1, n + 1)).requires_grad_()
  wt = torch.tensor(w).permute(n + 1, n, *range(n)).requires_grad_()
  bt = torch.tensor(b).requires_grad_()
  pairs = [(padding, padding)] * n if isinstance(padding, int) else list(padding)
  # F.pad lists the last dim first: (left, right, top, bottom).
  flat = [v for lo_hi in reversed(pairs) for v in lo_hi]
  conv = F.conv2d if n == 2 else F.conv1d
  y = conv(F.pad(xt, flat), wt, bt, stride=stride, dilation=dilation, groups=groups)
  return xt, wt, bt, y


@pytest.mark.parametrize("spatial, kernel, stride, padding, dilation, groups, c, o", _TORCH_2D)
def test_conv2d_matches_torch_forward_and_grads(torch, spatial, kernel, stride, padding, dilation, groups,
                                                c, o):
  x = _normal(6, (2, *spatial, c))
  w = _normal(7, (*kernel, c // groups, o))
  b = _normal(8, (o,))
  xt, wt, bt, yt = _torch_conv(torch, x, w, b, stride, padding, dilation, groups, 2)
  expected = yt.detach().permute(0, 2, 3, 1).numpy()
  ct = _normal(9, expected.shape)
  yt.backward(torch.tensor(ct).permute(0, 3, 1, 2))
  expected_dx = xt.grad.permute(0, 2, 3, 1).numpy()
  expected_dw = wt.grad.permute(2, 3, 1, 0).numpy()
  expected_db = bt.grad.numpy()

  kwargs = dict(strides=stride, padding=padding, dilation=dilation, groups=groups)
  for lowering in LOWERINGS:
    with ops.conv_lowering(lowering):
      out, vjp = jax.vjp(jax.jit(lambda x, w, b: ops.conv2d(x, w, b, **kwargs)), x, w, b)
    dx, dw, db = vjp(jnp.asarray(ct))
    assert_close(out, expected)
    assert_close(dx, expected_dx)
    assert_close(dw, expected_dw)
    assert_close(db, expected_db)
  assert_close(_ours(reference.conv2d, "auto", x, w, b, **kwargs), expected)


@pytest.mark.parametrize("length, k, stride, padding, dilation, groups, c, o", [
    (11, 3, 1, 1, 1, 1, 3, 4),
    (12, 3, 2, ((2, 1),), 2, 2, 4, 6),
    (9, 4, 3, 2, 1, 3, 3, 3),
])
def test_conv1d_matches_torch_forward_and_grads(torch, length, k, stride, padding, dilation, groups, c, o):
  x = _normal(10, (2, length, c))
  w = _normal(11, (k, c // groups, o))
  b = _normal(12, (o,))
  xt, wt, bt, yt = _torch_conv(torch, x, w, b, stride, padding, dilation, groups, 1)
  expected = yt.detach().permute(0, 2, 1).numpy()
  ct = _normal(13, expected.shape)
  yt.backward(torch.tensor(ct).permute(0, 2, 1))

  kwargs = dict(strides=stride, padding=padding, dilation=dilation, groups=groups)
  for lowering in LOWERINGS:
    with ops.conv_lowering(lowering):
      out, vjp = jax.vjp(jax.jit(lambda x, w, b: ops.conv1d(x, w, b, **kwargs)), x, w, b)
    dx, dw, db = vjp(jnp.asarray(ct))
    assert_close(out, expected)
    assert_close(dx, xt.grad.permute(0, 2, 1).numpy())
    assert_close(dw, wt.grad.permute(2, 1, 0).numpy())
    assert_close(db, bt.grad.numpy())
  assert_close(_ours(reference.conv1d, "auto", x, w, b, **kwargs), expected)
