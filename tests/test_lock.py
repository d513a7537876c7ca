"""requirements.lock installs on Linux x86_64 (this machine, CI, clusters) and on macOS arm64 (a researcher's laptop).

For each platform the lines whose markers apply are resolved by pip against the package index as that platform would
see them (``pip install --dry-run --report --platform ...``: every pin must have a wheel for it, or be a known
pure-Python sdist), and every requirement of every locked package, from requirements.txt down, is walked with that
platform's markers: each must be met by a pin that applies there, and each pin that applies must be needed. This needs
the package index (macOS wheels are not on this machine's local mirror); without it the test fails, naming pip's
error, instead of skipping.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements.lock"
DIRECT = REPO / "requirements.txt"
CONDA_ENV = REPO / "envs" / "robustft.yaml"
#: What pip is told about each platform, and the marker variables its installs see.
PLATFORMS = {
    "linux-x86_64": (
        [f"manylinux_2_{minor}_x86_64" for minor in range(28, 4, -1)] + ["manylinux2014_x86_64", "linux_x86_64"],
        {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"},
    ),
    "macos-arm64": (
        ["macosx_14_0_arm64"],  # pip adds the older macOS versions and universal2
        {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64", "os_name": "posix"},
    ),
}
#: Pinned releases published as an sdist only; pure Python, so pip builds them on any platform.
PURE_PYTHON_SDISTS = {"connection-pool"}
#: Packages that only a CUDA build of torch needs.
CUDA_ONLY = re.compile(r"^(nvidia-|cuda-|triton$)")


def _python_version() -> str:
    """The Python the lock is for: the conda environment's (``python=3.11``), which ``make venv`` also uses."""
    pins = [d for d in yaml.safe_load(CONDA_ENV.read_text())["dependencies"] if isinstance(d, str)]
    versions = [d.split("=", 1)[1] for d in pins if d.startswith("python=")]
    assert len(versions) == 1, f"{CONDA_ENV}: expected one python=X.Y pin, got {pins}"
    return versions[0]


def _lock() -> dict[str, Requirement]:
    pins: dict[str, Requirement] = {}
    for number, line in enumerate(LOCK.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        name = canonicalize_name(req.name)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==" and not req.extras and not req.url, \
            f"{LOCK.name}:{number}: {line!r} is not a plain name==version pin"
        assert name not in pins, f"{LOCK.name}:{number}: {req.name} is pinned twice"
        pins[name] = req
    return pins


def _version(req: Requirement) -> str:
    return next(iter(req.specifier)).version


def _environment(platform: str) -> dict[str, str]:
    python = _python_version()
    return {**default_environment(), **PLATFORMS[platform][1], "python_version": python,
            "python_full_version": f"{python}.0", "implementation_name": "cpython",
            "platform_python_implementation": "CPython"}


def _applies(req: Requirement, env: dict[str, str], extra: str = "") -> bool:
    return req.marker is None or req.marker.evaluate({**env, "extra": extra})


def _pip_report(pins: list[Requirement], platform: str, tmp_path: Path) -> dict:
    """pip's installation report for exactly ``pins`` (no dependencies) as ``platform`` would resolve them."""
    requirements = tmp_path / f"{platform}.txt"
    requirements.write_text("".join(f"{req.name}=={_version(req)}\n" for req in pins))
    report = tmp_path / f"{platform}.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "--quiet",
               "--disable-pip-version-check", "--progress-bar", "off", "--python-version", _python_version(),
               "--implementation", "cp", "--target", str(tmp_path / "target"), "--report", str(report),
               "-r", str(requirements)]
    for tag in PLATFORMS[platform][0]:
        command += ["--platform", tag]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PIP_NO_INPUT": "1"})
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert result.returncode == 0, (
        f"requirements.lock does not resolve for {platform} (pip exit {result.returncode}; it needs the package "
        f"index): {' | '.join(errors) or result.stderr[-2000:]}"
    )
    return json.loads(report.read_text())


def test_lock_pins_match_the_direct_requirements_and_the_conda_environment():
    pins = _lock()
    for line in DIRECT.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            name = canonicalize_name(req.name)
            assert name in pins, f"{DIRECT.name}: {req.name} is not in {LOCK.name}"
            assert str(req.specifier) == str(pins[name].specifier), f"{req.name}: {req.specifier} vs the lock"
    pip_section = [d for d in yaml.safe_load(CONDA_ENV.read_text())["dependencies"] if isinstance(d, dict)]
    assert pip_section == [{"pip": ["-r ../requirements.lock"]}], f"{CONDA_ENV}: its pip section must be the lock"
    assert (CONDA_ENV.parent / "../requirements.lock").resolve() == LOCK
    assert _python_version() == "3.11"


def test_every_pin_applies_on_linux_and_the_cuda_ones_only_there():
    linux, mac = _environment("linux-x86_64"), _environment("macos-arm64")
    for name, req in _lock().items():
        assert _applies(req, linux), f"{req}: every pin applies on Linux x86_64"
        if CUDA_ONLY.match(name):
            assert not _applies(req, mac), f"{req}: a CUDA package needs a Linux-only marker"


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_lock_resolves_and_is_closed_for(platform, tmp_path):
    env = _environment(platform)
    pins = {name: req for name, req in _lock().items() if _applies(req, env)}
    report = _pip_report(list(pins.values()), platform, tmp_path)

    found = {canonicalize_name(item["metadata"]["name"]): item for item in report["install"]}
    assert sorted(found) == sorted(pins), f"pip resolved {sorted(set(found) ^ set(pins))} differently"
    for name, item in found.items():
        assert item["metadata"]["version"] == _version(pins[name]), name
    sdists = {name for name, item in found.items() if not item["download_info"]["url"].endswith(".whl")}
    assert sdists <= PURE_PYTHON_SDISTS, f"no {platform} wheel for {sorted(sdists - PURE_PYTHON_SDISTS)}"

    # Walk every requirement from requirements.txt down, with this platform's markers (and the extras asked for).
    requires = {name: [Requirement(r) for r in item["metadata"].get("requires_dist", [])]
                for name, item in found.items()}
    todo = [(Requirement(line.split("#", 1)[0]), "requirements.txt") for line in DIRECT.read_text().splitlines()
            if line.split("#", 1)[0].strip()]
    needed: set[tuple[str, str]] = set()
    while todo:
        req, by = todo.pop()
        name = canonicalize_name(req.name)
        assert name in pins, f"{by} needs {req} on {platform}; requirements.lock has no pin that applies there"
        assert req.specifier.contains(_version(pins[name]), prereleases=True), \
            f"{by} needs {req}; the lock pins {pins[name]}"
        for extra in ["", *sorted(req.extras)]:
            if (name, extra) in needed:
                continue
            needed.add((name, extra))
            by_here = f"{name}[{extra}]" if extra else name
            todo += [(sub, by_here) for sub in requires[name] if _applies(sub, env, extra)]
    unused = sorted(set(pins) - {name for name, _ in needed})
    assert not unused, f"requirements.lock pins {unused} on {platform}, which nothing there needs (add a marker?)"
