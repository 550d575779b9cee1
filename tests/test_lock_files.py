"""The lock files pin what pyproject.toml asks for, each pin with hashes (scripts/lock.sh).

pip's own requirement parser (packaging) reads both files, not ours, so a dependency added to
pyproject.toml without re-running scripts/lock.sh fails here rather than on a fresh machine.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _pins(path: Path) -> dict[str, str]:
    """name -> pinned version of a pip-compile output; every pin has at least one hash."""
    pins: dict[str, str] = {}
    logical = path.read_text().replace("\\\n", " ")
    for line in logical.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("-"), f"{path.name}: an option line {line!r}"
        spec, _, rest = line.partition(" ")
        requirement = Requirement(spec)
        assert "--hash=sha256:" in rest, f"{path.name}: {spec} has no hash"
        (pinned,) = requirement.specifier
        assert pinned.operator == "==", f"{path.name}: {spec} is not pinned"
        pins[canonicalize_name(requirement.name)] = pinned.version
    return pins


PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


@pytest.mark.parametrize(
    ("lock", "requirements"),
    [
        ("requirements.lock", PROJECT["dependencies"]),
        (
            "requirements-dev.lock",
            PROJECT["dependencies"] + PROJECT["optional-dependencies"]["dev"],
        ),
    ],
)
def test_every_dependency_is_pinned_within_its_range(lock: str, requirements: list[str]) -> None:
    pins = _pins(ROOT / lock)
    for text in requirements:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{lock} lacks {name}: run scripts/lock.sh"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{lock} pins {name}=={pins[name]}, outside {requirement.specifier}: run scripts/lock.sh"
        )


def test_the_runtime_lock_agrees_with_the_development_lock() -> None:
    runtime, dev = _pins(ROOT / "requirements.lock"), _pins(ROOT / "requirements-dev.lock")
    assert {name: dev.get(name) for name in runtime} == runtime
