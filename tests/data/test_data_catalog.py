"""The tfds catalog path (resolution step (d)) with the real catalog builders and no network.

A local HTTP server on 127.0.0.1 serves files generated in the real formats (the four MNIST IDX .gz
files, a cifar-10-binary.tar.gz with the archive's layout and batches.meta.txt). tfds 4.9.10 has no
download-URL override, and the checksums registered for the real URLs reject generated files (also when
put in tfds' manual-download directory), so each test points the catalog builder's download URL (its
`URL` attribute, or CIFAR's `_cifar_info`) at the server and registers the generated files' sizes and
SHA-256s as the builder's `url_infos`, the table tfds verifies every download against. Everything else
is tfds' own code: `download_and_prepare`, the download manager and downloader (requests over HTTP),
checksum validation, tar.gz extraction, the builder's split generators and example encoding (PNG through
TensorFlow), array_record writing; jaxcnn then reads the prepared dataset back through `resolve`.
"""
from __future__ import annotations

import functools
import gzip
import http.server
import io
import os
import pathlib
import re
import socket
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pytest
from conftest import idx_bytes

from jaxcnn.data import load_arrays, resolve, specs
from jaxcnn.data import datasets as resolve_module
from jaxcnn.errors import DataError

REPO = pathlib.Path(__file__).resolve().parents[2]
# Generated examples per split (the real files hold 60000/10000 and 50000/10000).
COUNTS = {"train": 12, "test": 5}
CIFAR_PER_BATCH = {"train": 2, "test": 5}  # five train batches of 2 records, one test batch of 5


def _images(count: int, shape, seed: int) -> np.ndarray:
  """Random uint8 images whose first pixel is the example's index (to match examples after shuffling)."""
  images = np.random.default_rng(seed).integers(0, 256, (count, *shape), dtype=np.uint8)
  images.reshape(count, -1)[:, 0] = np.arange(count)
  return images


def _write_mnist_like(directory: pathlib.Path) -> dict:
  directory.mkdir(parents=True)
  arrays = {}
  for seed, (split, names) in enumerate(specs.MNIST.files.items()):
    images = _images(COUNTS[split], (28, 28), seed)
    labels = np.random.default_rng(10 + seed).integers(0, 10, COUNTS[split]).astype(np.uint8)
    for name, array in zip(names, (images, labels)):
      (directory / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array), mtime=0))
    arrays[split] = (images[..., None], labels)
  return arrays


def _write_cifar10(path: pathlib.Path) -> dict:
  """cifar-10-binary.tar.gz laid out as the real one: cifar-10-batches-bin/{batches, batches.meta.txt}."""
  arrays = {}
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
    def add(name: str, content: bytes):
      info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
      info.size = len(content)
      tar.addfile(info, io.BytesIO(content))

    for seed, (split, names) in enumerate(specs.CIFAR10.files.items()):
      count = CIFAR_PER_BATCH[split] * len(names)
      images = _images(count, (32, 32, 3), 20 + seed)
      labels = np.random.default_rng(30 + seed).integers(0, 10, count).astype(np.uint8)
      records = np.concatenate([labels[:, None], images.transpose(0, 3, 1, 2).reshape(count, -1)], axis=1)
      per = CIFAR_PER_BATCH[split]
      for i, name in enumerate(names):
        add(name, records[i * per:(i + 1) * per].tobytes())
      arrays[split] = (images, labels)
    add("batches.meta.txt", ("\n".join(specs.CIFAR10.class_names) + "\n\n").encode())
  path.write_bytes(buffer.getvalue())
  return arrays


class _Quiet(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):  # no request log on stderr
    pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  """(base URL, {dataset: {split: (images, labels)}}) of a file server for the generated datasets."""
  root = tmp_path_factory.mktemp("www")
  served = {"mnist": _write_mnist_like(root / "mnist"), "fashion_mnist": _write_mnist_like(root / "fashion_mnist"),
            "cifar10": _write_cifar10(root / "cifar-10-binary.tar.gz")}
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{httpd.server_address[1]}/", served, root
  httpd.shutdown()
  httpd.server_close()
  thread.join()


def _point_catalog_at(monkeypatch, name: str, base: str, root: pathlib.Path | None) -> None:
  """Points the real catalog builder of `name` at `base` and registers the served files' checksums
  (`root` None: register made-up checksums, for a host that does not answer)."""
  from tensorflow_datasets.core.download import checksums
  from tensorflow_datasets.image_classification import cifar, mnist

  def url_info(filename: str):
    if root is None:
      return checksums.UrlInfo(size=1, checksum="0" * 64, filename=filename)
    return checksums.compute_url_info(root / filename)

  if name == "cifar10":
    original = cifar.Cifar10._cifar_info.fget
    url = base + "cifar-10-binary.tar.gz"
    monkeypatch.setattr(cifar.Cifar10, "_cifar_info", property(lambda self: original(self)._replace(url=url)))
    monkeypatch.setattr(cifar.Cifar10, "url_infos", {url: url_info("cifar-10-binary.tar.gz")})
    return
  cls = mnist.MNIST if name == "mnist" else mnist.FashionMNIST
  folder = f"{name}/"
  monkeypatch.setattr(cls, "URL", base + folder)
  # The builder reads exactly this many examples from the files.
  monkeypatch.setattr(mnist, "_TRAIN_EXAMPLES", COUNTS["train"])
  monkeypatch.setattr(mnist, "_TEST_EXAMPLES", COUNTS["test"])
  monkeypatch.setattr(cls, "url_infos", {base + folder + f"{n}.gz": url_info(f"{folder}{n}.gz")
                                         for names in specs.MNIST.files.values() for n in names})


@pytest.fixture
def no_raw_dirs(monkeypatch):
  monkeypatch.setattr(resolve_module, "SYSTEM_DIRS", ())
  monkeypatch.delenv("JAXCNN_DATA_DIR", raising=False)
  monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_catalog_builder_downloads_and_prepares_and_jaxcnn_reads_it_back(server, tmp_path, monkeypatch,
                                                                         no_raw_dirs, name):
  base, served, root = server
  _point_catalog_at(monkeypatch, name, base, root)
  tfds_dir = tmp_path / "tfds"
  resolved = resolve(name, tfds_data_dir=tfds_dir, download=True)
  assert resolved.source == "download" and resolved.prepared_now and resolved.spec is specs.get(name)
  assert pathlib.Path(str(resolved.path)).is_relative_to(tfds_dir / name)
  assert resolved.class_names == list(specs.get(name).class_names)
  assert resolved.builder.info.file_format.value == "array_record"  # read back without TensorFlow
  for split, (images, labels) in served[name].items():
    got_images, got_labels = resolved.read(split)
    assert got_images.dtype == np.uint8 and got_labels.dtype == np.int32
    assert got_images.shape == images.shape[:1] + specs.get(name).image_shape
    order = np.argsort(got_images.reshape(len(got_images), -1)[:, 0])  # tfds shuffles the examples
    np.testing.assert_array_equal(got_images[order], images.reshape(got_images.shape))
    np.testing.assert_array_equal(got_labels[order], labels)
  # Prepared once: the next resolution finds it in the tfds data dir and downloads nothing.
  again = resolve(name, tfds_data_dir=tfds_dir, download=True)
  assert again.source == "tfds" and not again.prepared_now
  images, labels = load_arrays(name, "test", tfds_data_dir=tfds_dir, download=False)
  assert sorted(labels.tolist()) == sorted(served[name]["test"][1].tolist())


def test_a_download_that_fails_its_registered_checksum_is_an_error_and_leaves_nothing(server, tmp_path, monkeypatch,
                                                                                     no_raw_dirs):
  base, _, root = server
  _point_catalog_at(monkeypatch, "mnist", base, root)
  from tensorflow_datasets.image_classification import mnist
  infos = dict(mnist.MNIST.url_infos)
  first = next(iter(infos))
  infos[first] = type(infos[first])(size=infos[first].size, checksum="f" * 64, filename=infos[first].filename)
  monkeypatch.setattr(mnist.MNIST, "url_infos", infos)
  tfds_dir = tmp_path / "tfds"
  with pytest.raises(DataError, match=r"tfds download: failed \(NonMatchingChecksumError: Artifact http://127"):
    resolve("mnist", tfds_data_dir=tfds_dir, download=True)
  assert not [p for p in tfds_dir.rglob("*") if p.is_file()]


def _closed_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def test_unreachable_download_host_is_one_line_saying_where_to_put_the_files(tmp_path, monkeypatch, no_raw_dirs):
  port = _closed_port()
  _point_catalog_at(monkeypatch, "mnist", f"http://127.0.0.1:{port}/", None)
  tfds_dir = tmp_path / "tfds"
  with pytest.raises(DataError) as info:
    resolve("mnist", tfds_data_dir=tfds_dir, download=True)
  message = str(info.value)
  assert "\n" not in message and info.value.exit_code == 2
  assert f"tfds download: failed (cannot reach 127.0.0.1:{port} (Connection refused)" in message, message
  assert message.endswith("Put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
                          "t10k-labels-idx1-ubyte.gz in <dir>/mnist/ and pass data_dir=<dir> "
                          "(or set JAXCNN_DATA_DIR=<dir>)"), message
  assert not tfds_dir.exists() or not [p for p in tfds_dir.rglob("*") if p.is_file()]


def test_missing_catalog_module_is_named_before_any_download(tmp_path, monkeypatch, no_raw_dirs):
  monkeypatch.setattr(resolve_module, "CATALOG_MODULES", {"jaxcnn_no_such_module": "jaxcnn-no-such-package"})
  monkeypatch.setattr(resolve_module, "_unreachable", lambda urls: pytest.fail("probed the network"))
  with pytest.raises(DataError, match=r"tfds download: not possible, the catalog's cifar10 needs "
                     r"jaxcnn-no-such-package \(pip install jaxcnn-no-such-package\)\. Put data_batch_1.bin"):
    resolve("cifar10", tfds_data_dir=tmp_path / "tfds", download=True)


def test_catalog_modules_are_declared_dependencies_and_installed():
  """What the catalog path needs is in pyproject's dependencies, so a fresh `pip install -e .` has it."""
  tomllib = pytest.importorskip("tomllib")  # Python 3.11+
  declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
  names = {re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-") for requirement in declared}
  for package in resolve_module.CATALOG_MODULES.values():
    assert package.lower().replace("_", "-") in names, package
  assert resolve_module._missing_catalog_modules() == [], "pip install -e . installs them"


def test_experiment_command_offline_exits_2_with_one_line(tmp_path):
  """`python -m experiments.cifar10` with no files and no network (a proxy that refuses every connection)."""
  port = _closed_port()
  env = dict(os.environ, JAXCNN_DATA_DIR="", JAX_PLATFORMS="cpu", HTTPS_PROXY=f"http://127.0.0.1:{port}",
             HTTP_PROXY=f"http://127.0.0.1:{port}", NO_PROXY="",
             PYTHONPATH=os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))))
  for key in ("https_proxy", "http_proxy", "no_proxy", "all_proxy", "ALL_PROXY"):
    env.pop(key, None)
  workdir = tmp_path / "run"
  result = subprocess.run([sys.executable, "-m", "experiments.cifar10", f"--workdir={workdir}",
                           f"--config.data.tfds_data_dir={tmp_path / 'tfds'}", "--config.data.download=True"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
  assert "Traceback" not in result.stdout + result.stderr
  lines = result.stderr.strip().splitlines()
  errors = [line for line in lines if line.startswith("error:")]
  assert len(errors) == 1 and errors[0] == lines[-1], result.stderr
  assert f"tfds download: failed (cannot reach 127.0.0.1:{port} (a proxy) (Connection refused)" in errors[0]
  assert "Put data_batch_1.bin ... data_batch_5.bin and test_batch.bin" in errors[0]
  assert not workdir.exists()
