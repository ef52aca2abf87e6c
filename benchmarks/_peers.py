"""The same network in the peers' idioms, with jaxcnn's weights copied across, and its FLOP count.

`layer_specs(model)` reads a jaxcnn `Sequential` into plain (kind, name, settings) records;
`TorchNet(specs, input_shape)` and `PlainFlaxNet(specs)` rebuild it as a PyTorch module (NCHW, what a
PyTorch user writes) and as a plain Flax linen module (nn.Conv / nn.max_pool / nn.Dense: what a Flax
user writes, lowering to `lax.conv_general_dilated` and `reduce_window`). `copy_to_torch` moves the
jaxcnn variables into the torch module (HWIO -> OIHW; the first Dense after a Flatten gets its rows
permuted from NHWC to NCHW order), so all contenders start from identical weights; the plain Flax model
uses the jaxcnn variables unchanged (the same names and layouts).
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn import layers as jl
from jaxcnn.ops import conv_lowering


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One layer of a Sequential: kind in conv2d | max_pool2d | avg_pool2d | dense | flatten | dropout |
  batch_norm | activation; `settings` holds what the peers need (sizes, padding, activation name)."""

  kind: str
  name: str
  settings: tuple


def _pair(value) -> tuple[int, int]:
  return (int(value), int(value)) if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)


def _activation_name(activation) -> str | None:
  if activation is None or isinstance(activation, str):
    return activation
  raise ValueError(f"benchmarks: only named activations translate to the peers, got {activation!r}")


def layer_specs(model) -> list[LayerSpec]:
  """The layers of a jaxcnn `Sequential` as LayerSpecs.

  Raises:
    ValueError: a layer or setting the peers' translation does not cover (the message names it).
  """
  if not isinstance(model, jl.Sequential):
    raise ValueError(f"benchmarks: the peers are built from a jaxcnn Sequential, got {type(model).__name__}")
  specs = []
  for layer in model.layers:
    name = layer.name
    if isinstance(layer, jl.Conv2D):
      if layer.groups != 1 or _pair(layer.dilation_rate) != (1, 1):
        raise ValueError(f"benchmarks: {name}: grouped or dilated convolutions are not translated")
      padding = layer.padding.lower() if isinstance(layer.padding, str) else layer.padding
      if padding == "same" and _pair(layer.strides) != (1, 1):
        raise ValueError(f"benchmarks: {name}: 'same' padding with strides > 1 has no torch equivalent")
      specs.append(LayerSpec("conv2d", name, (layer.filters, _pair(layer.kernel_size), _pair(layer.strides),
                                              padding, layer.use_bias, _activation_name(layer.activation))))
    elif isinstance(layer, (jl.MaxPool2D, jl.AvgPool2D)):
      if layer.padding != "valid":
        raise ValueError(f"benchmarks: {name}: only 'valid' pooling is translated")
      window = _pair(layer.pool_size)
      strides = window if layer.strides is None else _pair(layer.strides)
      kind = "max_pool2d" if isinstance(layer, jl.MaxPool2D) else "avg_pool2d"
      specs.append(LayerSpec(kind, name, (window, strides)))
    elif isinstance(layer, jl.Dense):
      specs.append(LayerSpec("dense", name, (layer.units, layer.use_bias, _activation_name(layer.activation))))
    elif isinstance(layer, jl.Flatten):
      specs.append(LayerSpec("flatten", name, ()))
    elif isinstance(layer, jl.Dropout):
      specs.append(LayerSpec("dropout", name, (float(layer.rate),)))
    elif isinstance(layer, jl.BatchNorm):
      if not (layer.use_scale and layer.use_bias):
        raise ValueError(f"benchmarks: {name}: BatchNorm without scale or bias is not translated")
      specs.append(LayerSpec("batch_norm", name, (float(layer.momentum), float(layer.epsilon))))
    elif isinstance(layer, jl.Activation):
      specs.append(LayerSpec("activation", name, (_activation_name(layer.activation),)))
    else:
      raise ValueError(f"benchmarks: layer {name} ({type(layer).__name__}) is not translated to the peers")
  return specs


# -- plain Flax -------------------------------------------------------------------------------------------

_FLAX_ACTIVATIONS = {"relu": nn.relu, "tanh": jnp.tanh, "sigmoid": nn.sigmoid,
                     "gelu": lambda x: nn.gelu(x, approximate=False), None: lambda x: x}


class PlainFlaxNet(nn.Module):
  """The network written with flax.linen's own layers (nn.Conv, nn.max_pool, nn.Dense, nn.Dropout,
  nn.BatchNorm), NHWC, as a Flax user would; the variable names match jaxcnn's."""

  specs: tuple

  @nn.compact
  def __call__(self, x, train: bool = False):
    for spec in self.specs:
      s = spec.settings
      if spec.kind == "conv2d":
        filters, kernel, strides, padding, use_bias, activation = s
        pad = padding.upper() if isinstance(padding, str) else padding
        x = nn.Conv(filters, kernel, strides, padding=pad, use_bias=use_bias, name=spec.name)(x)
        x = _FLAX_ACTIVATIONS[activation](x)
      elif spec.kind == "max_pool2d":
        x = nn.max_pool(x, s[0], s[1], padding="VALID")
      elif spec.kind == "avg_pool2d":
        x = nn.avg_pool(x, s[0], s[1], padding="VALID")
      elif spec.kind == "dense":
        units, use_bias, activation = s
        x = _FLAX_ACTIVATIONS[activation](nn.Dense(units, use_bias=use_bias, name=spec.name)(x))
      elif spec.kind == "flatten":
        x = x.reshape(x.shape[0], -1)
      elif spec.kind == "dropout":
        x = nn.Dropout(s[0], deterministic=not train)(x)
      elif spec.kind == "batch_norm":
        x = nn.BatchNorm(use_running_average=not train, momentum=s[0], epsilon=s[1], name=spec.name)(x)
      elif spec.kind == "activation":
        x = _FLAX_ACTIVATIONS[s[0]](x)
    return x


# -- PyTorch ------------------------------------------------------------------------------------------------

def _torch_activation(torch, name):
  table = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid, "gelu": torch.nn.GELU}
  if name is None:
    return None
  if name not in table:
    raise ValueError(f"benchmarks: activation {name!r} is not translated to torch")
  return table[name]()


def build_torch(torch, specs, input_shape):
  """A torch.nn.Sequential equivalent of `specs` for NCHW input of (H, W, C) = input_shape.

  Returns:
    (module, plan): plan maps each jaxcnn layer name with weights to (torch submodule, how to copy),
    where "how" is "conv", "dense", ("dense_nhwc", (H, W, C)) or "batch_norm".
  """
  h, w, c = input_shape
  modules, plan = [], {}
  flat_from = None  # (H, W, C) of the last Flatten's input, until a Dense consumes it
  features = None
  for spec in specs:
    s = spec.settings
    if spec.kind == "conv2d":
      filters, kernel, strides, padding, use_bias, activation = s
      if padding == "valid":
        pad = 0
        h, w = (h - kernel[0]) // strides[0] + 1, (w - kernel[1]) // strides[1] + 1
      elif padding == "same":
        pad = "same"
      else:
        raise ValueError(f"benchmarks: {spec.name}: padding {padding!r} is not translated to torch")
      conv = torch.nn.Conv2d(c, filters, kernel, strides, padding=pad, bias=use_bias)
      modules.append(conv)
      plan[spec.name] = (conv, "conv")
      c = filters
      act = _torch_activation(torch, activation)
      if act is not None:
        modules.append(act)
    elif spec.kind in ("max_pool2d", "avg_pool2d"):
      window, strides = s
      cls = torch.nn.MaxPool2d if spec.kind == "max_pool2d" else torch.nn.AvgPool2d
      modules.append(cls(window, strides))
      h, w = (h - window[0]) // strides[0] + 1, (w - window[1]) // strides[1] + 1
    elif spec.kind == "flatten":
      modules.append(torch.nn.Flatten())
      flat_from = (h, w, c)
      features = h * w * c
    elif spec.kind == "dense":
      units, use_bias, activation = s
      fan_in = features if features is not None else c
      linear = torch.nn.Linear(fan_in, units, bias=use_bias)
      modules.append(linear)
      plan[spec.name] = (linear, ("dense_nhwc", flat_from) if flat_from is not None else "dense")
      flat_from, features, c = None, units, units
      act = _torch_activation(torch, activation)
      if act is not None:
        modules.append(act)
    elif spec.kind == "dropout":
      modules.append(torch.nn.Dropout(s[0]))
    elif spec.kind == "batch_norm":
      # torch's momentum weighs the new batch, Keras' the old statistics.
      cls = torch.nn.BatchNorm2d if features is None else torch.nn.BatchNorm1d
      bn = cls(c, eps=s[1], momentum=1.0 - s[0])
      modules.append(bn)
      plan[spec.name] = (bn, "batch_norm")
    elif spec.kind == "activation":
      act = _torch_activation(torch, s[0])
      if act is not None:
        modules.append(act)
  return torch.nn.Sequential(*modules), plan


def copy_to_torch(torch, plan, variables) -> None:
  """Copies jaxcnn `variables` ({"params", "batch_stats"?}) into the torch modules of `plan`."""
  params = variables["params"]
  stats = variables.get("batch_stats", {})
  with torch.no_grad():
    for name, (module, how) in plan.items():
      p = {k: np.array(v) for k, v in params[name].items()}
      if how == "conv":
        module.weight.copy_(torch.from_numpy(np.ascontiguousarray(p["kernel"].transpose(3, 2, 0, 1))))
      elif how == "dense":
        module.weight.copy_(torch.from_numpy(np.ascontiguousarray(p["kernel"].T)))
      elif isinstance(how, tuple) and how[0] == "dense_nhwc":
        h, w, c = how[1]
        # Rows of the NHWC-flattened kernel are (h, w, c); torch flattens NCHW as (c, h, w).
        kernel = p["kernel"].reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
        module.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.T)))
      elif how == "batch_norm":
        module.weight.copy_(torch.from_numpy(p["scale"]))
        module.running_mean.copy_(torch.from_numpy(np.array(stats[name]["mean"])))
        module.running_var.copy_(torch.from_numpy(np.array(stats[name]["var"])))
      if "bias" in p:
        module.bias.copy_(torch.from_numpy(p["bias"]))


# -- FLOPs --------------------------------------------------------------------------------------------------

def _sub_jaxprs(params):
  for value in params.values():
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
      if isinstance(v, jax.extend.core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jax.extend.core.Jaxpr):
        yield v


def _count_flops(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      out = eqn.outvars[0].aval.shape
      rhs = eqn.invars[1].aval.shape
      out_features_dim = eqn.params["dimension_numbers"].rhs_spec[0]
      total += 2 * math.prod(out) * math.prod(rhs) // rhs[out_features_dim]
    elif name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
    for sub in _sub_jaxprs(eqn.params):
      total += _count_flops(sub)
  return total


def forward_flops(model, variables, x) -> int:
  """Multiply-add FLOPs (2 per MAC) of the convolutions and matmuls of one forward pass on `x`.

  Traced with the XLA convolution lowering, whose convolutions count exactly what the layer computes
  (the im2col lowering's matmuls count the same, plus nothing for its slices).
  """
  with conv_lowering("xla"):
    closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
  return _count_flops(closed.jaxpr)


def training_flops(forward: int) -> int:
  """FLOPs of one training step by the usual convention: 3 x forward (forward, input gradients, weight
  gradients). The first layer needs no input gradient, so this slightly overstates the work."""
  return 3 * forward


def max_abs_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))

