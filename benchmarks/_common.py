"""What the benchmarks share: the machine record, interleaved timing, statistics, tables and JSON output."""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import statistics
import time
from typing import Callable, Mapping, Sequence

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo ("unknown" where it is not readable)."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
  """The feature flags of the first CPU in /proc/cpuinfo (empty where it is not readable)."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith(("flags", "Features")):
        return set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return set()


def _cpu_ghz() -> float | None:
  """The nominal clock from the model name ("... @ 2.60GHz"), else the highest current "cpu MHz"."""
  import re
  model = re.search(r"@\s*([0-9.]+)\s*GHz", cpu_model())
  if model:
    return float(model.group(1))
  try:
    mhz = [float(line.split(":", 1)[1]) for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
           if line.startswith("cpu MHz")]
  except (OSError, ValueError):
    mhz = []
  return max(mhz) / 1000.0 if mhz else None


def cpu_peak(cores: int | None = None, *, flags: set[str] | None = None, ghz: float | None = None,
             fma_units: int | None = None) -> dict:
  """The fp32 peak of `cores` cores derived from the CPU's own flags, as
  cores x GHz x SIMD lanes x 2 (FMA: a multiply and an add) x FMA units per core.

  Lanes: 16 with avx512f, 8 with avx/avx2, 4 otherwise (SSE). FMA units: 2 on AVX2/AVX-512 cores (Intel
  Haswell and later, AMD Zen 2 and later); 1 on AMD Zen 1 (AVX2 without clwb: 256-bit work split in
  two halves); `fma_units` overrides (e.g. 1 for Xeon Silver/Bronze AVX-512 parts, which flags cannot
  tell). Without FMA a multiply and an add issue separately (still 2 FLOPs per lane per cycle on the two
  ports), counted as 1 unit of 2. Returns {"gflops", "cores", "ghz", "lanes", "fma", "fma_units", "how"}.
  """
  flags = cpu_flags() if flags is None else flags
  cores = usable_cores() if cores is None else cores
  ghz = _cpu_ghz() if ghz is None else ghz
  lanes = 16 if "avx512f" in flags else 8 if ("avx2" in flags or "avx" in flags) else 4
  fma = "fma" in flags or "avx512f" in flags
  if fma_units is None:
    fma_units = 1 if (not fma or ("avx2" in flags and "avx512f" not in flags and "sse4a" in flags
                                 and "clwb" not in flags)) else 2
  isa = "AVX-512" if lanes == 16 else "AVX2" if "avx2" in flags else "AVX" if lanes == 8 else "SSE"
  gflops = cores * (ghz or 0.0) * lanes * 2 * fma_units
  how = (f"{cores} cores x {ghz or 0:.2f} GHz x {lanes} fp32 lanes ({isa}{'+FMA' if fma else ''}) x 2 x "
         f"{fma_units} FMA unit(s)")
  return {"gflops": gflops, "cores": cores, "ghz": ghz, "lanes": lanes, "fma": fma, "fma_units": fma_units,
          "isa": isa, "how": how}


def usable_cores() -> int:
  """Cores this process may run on (its affinity mask), which is what every contender is given."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def load_average() -> tuple[float, float, float] | None:
  """The 1, 5 and 15 minute load averages, or None where the OS has none."""
  try:
    return tuple(round(v, 2) for v in os.getloadavg())
  except OSError:
    return None


def machine_info() -> dict:
  """Where and when a result was measured: CPU, cores, load, library versions, XLA flags, UTC time."""
  import jax
  import jaxlib
  info = {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
      "cpu": cpu_model(),
      "cores": usable_cores(),
      "cpu_flags": sorted(cpu_flags() & {"avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "sse4_2"}),
      "cpu_peak": cpu_peak(),
      "load_average_start": load_average(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "jax_backend": jax.default_backend(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  for name in ("flax", "optax", "torch"):
    try:
      info[name] = __import__(name).__version__
    except ImportError:
      info[name] = None
  return info


def set_torch_threads(torch_module, cores: int) -> int:
  """Gives PyTorch the same thread budget as XLA (one intra-op thread per usable core)."""
  torch_module.set_num_threads(cores)
  return torch_module.get_num_threads()


def interleave(contenders: Mapping[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
  """Runs every contender once per round, round-robin, `repeats` rounds.

  Interleaving spreads any drift of the machine's load over all contenders alike, so their ratios stay
  meaningful on a shared machine where absolute times do not.

  Args:
    contenders: name -> a callable that performs one measured unit and returns its own elapsed seconds
      (each contender synchronises its device work before stopping its clock).
    repeats: rounds (>= 1).

  Returns:
    name -> list of `repeats` elapsed times, in round order.
  """
  if repeats < 1:
    raise ValueError(f"interleave: repeats must be >= 1, got {repeats}")
  samples: dict[str, list[float]] = {name: [] for name in contenders}
  for _ in range(repeats):
    for name, measure in contenders.items():
      samples[name].append(float(measure()))
  return samples


def timed(fn: Callable[[], object]) -> float:
  """Seconds `fn()` takes (it must block until its work is done)."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def spread(values: Sequence[float]) -> dict[str, float]:
  """median, min, max, and the interquartile range (q25, q75) of `values` (non-empty)."""
  values = sorted(float(v) for v in values)
  if not values:
    raise ValueError("spread: no values")
  if len(values) >= 4:
    q25, _, q75 = statistics.quantiles(values, n=4, method="inclusive")
  else:
    q25, q75 = values[0], values[-1]
  return {"median": statistics.median(values), "min": values[0], "max": values[-1], "q25": q25,
          "q75": q75, "n": len(values)}


def per_round_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
  """numerator[i] / denominator[i] for each round: the ratio within a round shares that round's load."""
  if len(numerator) != len(denominator):
    raise ValueError("per_round_ratios: the sample lists differ in length")
  return [a / b for a, b in zip(numerator, denominator)]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  """A plain-text table with right-aligned numeric columns (floats with 2 decimals)."""
  cells = [[_cell(v) for v in row] for row in rows]
  widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
  lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
  lines.append("  ".join("-" * w for w in widths))
  for row in cells:
    lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
  return "\n".join(lines)


def _cell(value) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.2f}"
  return str(value)


def write_result(name: str, payload: dict, path: str | os.PathLike | None = None) -> pathlib.Path:
  """Writes `payload` as JSON to `path` (default benchmarks/results/<name>.json); returns the path."""
  out = pathlib.Path(path) if path else RESULTS_DIR / f"{name}.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_suffix(out.suffix + ".tmp")
  tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, out)
  return out


def set_config_path(config, path: str, value, parser=None) -> None:
  """config[a][b] = value for the dotted `path` "a.b" (a --set override); a parser error when it has no such key."""
  *parents, leaf = path.split(".")
  node = config
  for part in parents:
    if not hasattr(node, "keys") or part not in node:
      node = None
      break
    node = node[part]
  if node is None or not hasattr(node, "keys") or leaf not in node:
    message = f"--set {path}: the config has no key {path!r}; top-level keys: {', '.join(sorted(config))}"
    if parser is None:
      raise KeyError(message)
    parser.error(message)
  setattr(node, leaf, value)
