"""The installable package: pyproject.toml's metadata against the pinned lock (requirements*.txt).

The wheel is built offline (`pip wheel --no-deps --no-build-isolation --no-index`, setuptools from
the environment) from a copy of the build inputs in a temporary directory: setuptools builds in the
source tree, where it would leave build/ and fcos_jax.egg-info behind and put stale build/lib
files into the wheel. The copy takes the whole fcos_jax/ folder, so a file the wheel leaves out is
one the build leaves out.
"""

import email.parser
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "fcos_jax"
EXTRAS = ("convert", "dev", "export")
# Top-level files that take part in a setuptools build (those present are copied).
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "setup.py", "setup.cfg", "MANIFEST.in")
# requirements-export.txt entries the `export` extra does not list: jax2onnx declares an
# orbax-checkpoint cap below our pin, so it is installed with --no-deps (pyproject.toml says so);
# sympy and mpmath come with onnxruntime.
NOT_IN_EXPORT_EXTRA = {"jax2onnx", "sympy", "mpmath"}


def _pins(filename: str) -> dict[str, Requirement]:
    """name -> `name==version` requirement for each pin of a requirements file (not its -r)."""
    pins = {}
    for line in (REPO / filename).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        requirement = Requirement(line)
        assert [s.operator for s in requirement.specifier] == ["=="], line
        pins[canonicalize_name(requirement.name)] = requirement
    return pins


def _pinned_version(requirement: Requirement) -> str:
    return next(iter(requirement.specifier)).version


def _package_files() -> set[str]:
    """Every file of the package in the repo (bytecode caches aside), as wheel paths."""
    return {
        path.relative_to(REPO).as_posix()
        for path in (REPO / PACKAGE).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Iterator[zipfile.ZipFile]:
    tmp = tmp_path_factory.mktemp("packaging")
    source, out = tmp / "source", tmp / "wheels"
    shutil.copytree(
        REPO / PACKAGE, source / PACKAGE, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    for name in BUILD_INPUTS:
        if (REPO / name).exists():
            shutil.copy2(REPO / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    command += ["--no-index", "--disable-pip-version-check", "-w", str(out), str(source)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    (path,) = out.glob(f"{PACKAGE}-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


@pytest.fixture(scope="module")
def metadata(wheel):
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    return email.parser.Parser().parsestr(wheel.read(name).decode())


def _declared(metadata, extra: str | None) -> dict[str, Requirement]:
    """name -> requirement that `pip install fcos_jax[extra]` adds (extra None: the runtime ones),
    following the package's references to its own extras."""
    declared = {}
    for line in metadata.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        if requirement.marker is None:
            if extra is None:
                declared[canonicalize_name(requirement.name)] = requirement
        elif extra is not None and requirement.marker.evaluate({"extra": extra}):
            if canonicalize_name(requirement.name) == canonicalize_name(PACKAGE):
                for own in requirement.extras:
                    declared.update(_declared(metadata, own))
            else:
                declared[canonicalize_name(requirement.name)] = requirement
    return declared


def _assert_pins_satisfy(pins: dict[str, Requirement], declared: dict[str, Requirement], where):
    missing = sorted(set(pins) - set(declared))
    assert not missing, f"{where} does not declare {missing}"
    for name, pin in pins.items():
        version = _pinned_version(pin)
        specifier = declared[name].specifier
        assert specifier.contains(version, prereleases=True), (
            f"{where}: {declared[name]} excludes the locked {pin}"
        )


def test_runtime_requirements_declare_every_lock_pin(metadata):
    runtime = _declared(metadata, None)
    _assert_pins_satisfy(_pins("requirements.txt"), runtime, "[project] dependencies")
    # Nothing beyond the lock: a dependency added to pyproject.toml alone is never tested.
    extra = sorted(set(runtime) - set(_pins("requirements.txt")))
    assert not extra, f"declared but not in requirements.txt: {extra}"


def test_extras_exist_and_match_the_dev_and_export_locks(metadata):
    assert set(EXTRAS) <= set(metadata.get_all("Provides-Extra") or [])
    dev_pins = _pins("requirements-dev.txt")
    _assert_pins_satisfy(dev_pins, _declared(metadata, "dev"), "the dev extra")
    convert = _declared(metadata, "convert")
    assert set(convert) == {"torch", "torchvision"}
    _assert_pins_satisfy({n: dev_pins[n] for n in convert}, convert, "the convert extra")
    export_pins = _pins("requirements-export.txt")
    export = _declared(metadata, "export")
    assert set(export) == set(export_pins) - NOT_IN_EXPORT_EXTRA
    _assert_pins_satisfy({n: export_pins[n] for n in export}, export, "the export extra")
    for extra in EXTRAS:
        assert "jax2onnx" not in _declared(metadata, extra), f"jax2onnx in the {extra} extra"


def test_wheel_contains_every_package_file(wheel):
    missing = sorted(_package_files() - set(wheel.namelist()))
    # A non-.py file listed here needs declaring as package data in pyproject.toml.
    assert not missing, f"not in the wheel: {missing}"
    # The `python -m fcos_jax.<tool>` entry points README and the Makefile use.
    tools = (
        "predict/__main__.py",
        "compare/__main__.py",
        "convert/__main__.py",
        "export/__main__.py",
    )
    assert {f"{PACKAGE}/{tool}" for tool in tools} <= set(wheel.namelist())
