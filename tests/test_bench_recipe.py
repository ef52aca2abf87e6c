"""benchmarks: the PyTorch twin of experiments.mnist matches the recipe (model size, schedule, data split),
and the percent-of-peak denominator follows the CPU's flags. Nothing here is timed."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks import _common, mnist_torch


def test_peak_follows_the_simd_width_and_fma_units():
  avx2 = _common.cpu_peak(2, flags={"avx", "avx2", "fma"}, ghz=2.5)
  assert avx2["gflops"] == pytest.approx(2 * 2.5 * 8 * 2 * 2) and avx2["isa"] == "AVX2"
  avx512 = _common.cpu_peak(2, flags={"avx", "avx2", "fma", "avx512f"}, ghz=2.5)
  assert avx512["gflops"] == pytest.approx(2 * avx2["gflops"]) and avx512["isa"] == "AVX-512"
  zen1 = _common.cpu_peak(2, flags={"avx", "avx2", "fma", "sse4a"}, ghz=2.5)
  assert zen1["fma_units"] == 1
  zen2 = _common.cpu_peak(2, flags={"avx", "avx2", "fma", "sse4a", "clwb"}, ghz=2.5)
  assert zen2["fma_units"] == 2
  sse = _common.cpu_peak(1, flags={"sse4_2"}, ghz=2.0)
  assert sse["gflops"] == pytest.approx(1 * 2.0 * 4 * 2 * 1) and not sse["fma"]
  assert _common.cpu_peak(4, flags={"avx2", "fma"}, ghz=2.0, fma_units=1)["gflops"] == pytest.approx(128.0)


def test_this_machine_has_a_peak():
  peak = _common.cpu_peak()
  assert peak["cores"] >= 1 and peak["lanes"] in (4, 8, 16)
  assert peak["ghz"] is None or peak["gflops"] > 0


def test_twin_schedule_is_optax_warmup_cosine():
  import optax
  reference = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 130, 1335)
  for step in (0, 1, 65, 129, 130, 131, 700, 1334, 1335):
    assert mnist_torch.schedule(step, 3e-3, 130, 1335) == pytest.approx(float(reference(step)), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("init", ["torch", "keras"])
def test_twin_model_has_mnist_fast_cnn_parameters(init):
  torch = pytest.importorskip("torch")
  model = mnist_torch.build(torch, init)
  trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
  assert trainable == 188_522  # jaxcnn's mnist_fast_cnn (tests/experiments/test_exp_mnist.py)
  model.eval()
  assert tuple(model(torch.zeros(2, 1, 28, 28)).shape) == (2, 10)
  if init == "keras":
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert float(linear.bias.abs().max()) == 0.0
    bound = float(np.sqrt(6.0 / (128 + 10)))
    assert float(linear.weight.abs().max()) <= bound


def test_twin_reads_idx_files(tmp_path):
  import gzip
  import struct
  images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
  path = tmp_path / "x.gz"
  path.write_bytes(gzip.compress(struct.pack(">I3I", 0x0803, 2, 28, 28) + images.tobytes()))
  np.testing.assert_array_equal(mnist_torch.read_idx(path), images)
