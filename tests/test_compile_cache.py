"""The persistent compilation cache of the experiment commands (jaxcnn/_compile_cache.py): a second process
loads its programs instead of compiling them; the config key, the environment variable and "off"; the
per-user default directory; a directory that cannot be written; processes sharing one directory."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from jaxcnn import _compile_cache

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# A minimal experiment command: the runner's flags, cache setup and summary, one small jitted program.
_COMMAND = textwrap.dedent('''
    import ml_collections
    from experiments import _common, _runner

    def get_config():
      c = ml_collections.ConfigDict()
      c.size = 8
      return c

    def main(config, workdir):
      import jax
      import jax.numpy as jnp

      @jax.jit
      def step(x):
        return jnp.tanh(x @ x.T + 1.0).sum()

      value = float(step(jnp.ones((config.size, config.size))))
      _common.write_summary(workdir, experiment="cache_probe", config=config, results={"value": value})

    if __name__ == "__main__":
      _runner.run("cache_probe", get_config, main)
    ''')


@pytest.fixture()
def command(tmp_path) -> pathlib.Path:
  path = tmp_path / "cache_probe.py"
  path.write_text(_COMMAND)
  return path


def _env(tmp_path, **changes) -> dict[str, str]:
  """The test process' environment with PYTHONPATH at this checkout, XDG_CACHE_HOME in tmp_path and
  the compilation cache variables (the session's, see conftest.py) removed unless given."""
  env = {k: v for k, v in os.environ.items()
         if k != _compile_cache.ENV_VAR and not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
  env.update(PYTHONPATH=str(REPO_ROOT), XDG_CACHE_HOME=str(tmp_path / "xdg"))
  env.update(changes)
  return env


def _run(command, workdir, env, *args):
  proc = subprocess.run([sys.executable, str(command), f"--workdir={workdir}", *args], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads((pathlib.Path(workdir) / "summary.json").read_text())
  return proc, summary["timing"]["compilation_cache"]


def _entries(directory: pathlib.Path) -> list[pathlib.Path]:
  return [p for p in directory.rglob("*-cache*")] if directory.is_dir() else []


def test_second_process_loads_its_programs_from_the_cache(command, tmp_path):
  cache = tmp_path / "cache"
  env = _env(tmp_path, JAXCNN_COMPILATION_CACHE=str(cache))
  _, first = _run(command, tmp_path / "w1", env)
  assert first["enabled"] and first["dir"] == str(cache) and first["source"] == "env"
  assert first["misses"] >= 1 and first["hits"] == 0
  assert _entries(cache)
  proc, second = _run(command, tmp_path / "w2", env)
  assert second["hits"] >= 1 and second["misses"] == 0, second
  assert f"compilation cache: {second['hits']} hits, 0 misses" in proc.stdout


def test_default_is_a_per_user_directory(command, tmp_path):
  _, info = _run(command, tmp_path / "w", _env(tmp_path))
  expected = tmp_path / "xdg" / "jaxcnn" / "jax-compilation"
  assert info["enabled"] and info["source"] == "default" and info["dir"] == str(expected)
  assert _entries(expected)


def test_config_key_takes_precedence_over_the_environment(command, tmp_path):
  from_env, from_config = tmp_path / "env-cache", tmp_path / "config-cache"
  env = _env(tmp_path, JAXCNN_COMPILATION_CACHE=str(from_env))
  _, info = _run(command, tmp_path / "w", env, f"--config.compilation_cache={from_config}")
  assert info["source"] == "config" and info["dir"] == str(from_config)
  assert _entries(from_config) and not _entries(from_env)


@pytest.mark.parametrize("how", ["env", "config"])
def test_off_disables_the_cache(command, tmp_path, how):
  env = _env(tmp_path, JAXCNN_COMPILATION_CACHE="off") if how == "env" else _env(tmp_path)
  args = ["--config.compilation_cache=off"] if how == "config" else []
  proc, info = _run(command, tmp_path / "w", env, *args)
  assert not info["enabled"] and info["hits"] == 0 and info["misses"] == 0 and info["source"] == how
  assert not (tmp_path / "xdg").exists()
  assert "compilation cache: off" in proc.stdout


def test_unwritable_directory_is_one_warning_line_and_the_run_goes_on(command, tmp_path):
  blocker = tmp_path / "a-file"
  blocker.write_text("not a directory")
  target = blocker / "cache"  # cannot be created, even by root
  proc, info = _run(command, tmp_path / "w", _env(tmp_path, JAXCNN_COMPILATION_CACHE=str(target)))
  assert not info["enabled"] and str(target) in info["warning"]
  warnings = [line for line in proc.stderr.splitlines() if "compilation cache" in line]
  assert len(warnings) == 1 and warnings[0].startswith("warning: compilation cache off: cannot write")
  assert "Traceback" not in proc.stderr


def test_processes_running_at_once_share_one_directory(command, tmp_path):
  cache = tmp_path / "cache"
  env = _env(tmp_path, JAXCNN_COMPILATION_CACHE=str(cache))
  procs = [subprocess.Popen([sys.executable, str(command), f"--workdir={tmp_path / f'w{i}'}"], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for i in range(3)]
  for proc in procs:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err and "cache" not in err.lower(), err[-2000:]
  _, after = _run(command, tmp_path / "w-after", env)
  assert after["hits"] >= 1 and after["misses"] == 0


def test_resolve_precedence(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  monkeypatch.delenv(_compile_cache.ENV_VAR, raising=False)
  import jax
  # The suite's own session cache (conftest.py) is JAX's setting for this process: set it aside here.
  session_dir = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", None)
  try:
    _check_resolve_precedence(tmp_path, monkeypatch)
  finally:
    jax.config.update("jax_compilation_cache_dir", session_dir)


def _check_resolve_precedence(tmp_path, monkeypatch):
  assert _compile_cache.resolve("") == (tmp_path / "jaxcnn" / "jax-compilation", "default")
  monkeypatch.setenv(_compile_cache.ENV_VAR, str(tmp_path / "e"))
  assert _compile_cache.resolve(None) == (tmp_path / "e", "env")
  assert _compile_cache.resolve("  ") == (tmp_path / "e", "env")
  assert _compile_cache.resolve(str(tmp_path / "c")) == (tmp_path / "c", "config")
  assert _compile_cache.resolve("OFF") == (None, "config")
  monkeypatch.setenv(_compile_cache.ENV_VAR, "off")
  assert _compile_cache.resolve("") == (None, "env")
