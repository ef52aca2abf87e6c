"""The install is reproducible: constraints.txt pins every dependency within pyproject's ranges, and the
commands that install (README, .ci/run) use it."""
from __future__ import annotations

import re
import tomllib

import pytest

from helpers import REPO_ROOT

specifiers = pytest.importorskip("packaging.specifiers")
requirements = pytest.importorskip("packaging.requirements")


def _normalise(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
  pins = {}
  for number, line in enumerate((REPO_ROOT / "constraints.txt").read_text().splitlines(), 1):
    line = line.split("#", 1)[0].strip()
    if not line:
      continue
    match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", line)
    assert match, f"constraints.txt:{number}: {line!r} is not an exact 'name==version' pin"
    name = _normalise(match.group(1))
    assert name not in pins, f"constraints.txt:{number}: {name} is pinned twice"
    pins[name] = match.group(2)
  return pins


def _declared() -> list:
  project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
  declared = list(project["dependencies"])
  for extra in project.get("optional-dependencies", {}).values():
    declared += extra
  return [requirements.Requirement(r) for r in declared]


def test_every_declared_dependency_is_pinned_inside_its_range():
  pins = _pins()
  for requirement in _declared():
    name = _normalise(requirement.name)
    assert name in pins, f"{requirement} (pyproject.toml) has no pin in constraints.txt"
    assert requirement.specifier.contains(pins[name], prereleases=True), (
        f"constraints.txt pins {name}=={pins[name]}, outside pyproject's range {requirement}")


def test_declared_ranges_have_upper_bounds():
  # An open range lets any future release into a fresh install (a new pytest once failed the suite).
  for requirement in _declared():
    upper = [s for s in requirement.specifier if s.operator in ("<", "<=", "==", "~=")]
    assert upper, f"{requirement} (pyproject.toml) has no upper bound"


@pytest.mark.parametrize("path", ["README.md", ".ci/run"])
def test_install_commands_use_the_constraints(path):
  text = (REPO_ROOT / path).read_text()
  installs = [line for line in text.splitlines() if re.search(r"pip install -e \"?\.\[test\]", line)]
  assert installs, f"{path} has no test install command"
  for line in installs:
    assert "-c constraints.txt" in line, f"{path}: {line.strip()!r} installs without constraints.txt"
