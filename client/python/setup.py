"""The keymesh package's build helpers, and its setuptools setup().

    pip install --no-build-isolation --no-index ./client/python

pip builds through _keymesh_build.py (pyproject.toml's backend), which uses
the helpers below; setup() serves setuptools' own commands (sdist,
`python3 setup.py build`).

The wheel carries keymesh/libkeymesh.so.0 and keymesh/_native<EXT_SUFFIX>
(RPATH $ORIGIN), so the installed package needs no PYTHONPATH and no
KEYMESH_LIB. Where they come from:

- $KEYMESH_BUILD_DIR set: that already built CMake build directory (its
  lib/libkeymesh.so.0 and python/keymesh/_native*); nothing is compiled
  (the test suite installs from the ctest build this way).
- otherwise: CMake configures the checkout root (two levels up) in the
  setuptools build directory and builds the targets keymesh and
  keymesh_python (-j2; Boost and hiredis as scripts/setup installs them),
  for the interpreter running this build.

The version is the one of CMakeLists.txt's project(), the library's.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Dict, List

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent  # client/python -> the checkout
LIBRARY = "libkeymesh.so.0"  # the soname the extension links to


def version() -> str:
    text = (ROOT / "CMakeLists.txt").read_text()
    m = re.search(r"project\(\s*KeyMesh\s+VERSION\s+([0-9][0-9.]*)", text)
    if not m:
        raise SystemExit(f"keymesh setup.py: no project(KeyMesh VERSION ...) in {ROOT / 'CMakeLists.txt'}")
    return m.group(1)


def native_name() -> str:
    return "_native" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def cmake_build(build_dir: Path) -> Path:
    """Configures the checkout in build_dir and builds the two targets."""
    if not (ROOT / "CMakeLists.txt").is_file():
        raise SystemExit(f"keymesh setup.py: {ROOT} is not a KeyMesh checkout; set KEYMESH_BUILD_DIR to a built "
                         "build directory instead")
    cmake = shutil.which("cmake")
    if cmake is None:
        raise SystemExit("keymesh setup.py: cmake is missing (scripts/setup --deps-only installs it), or set "
                         "KEYMESH_BUILD_DIR to a built build directory")
    build_dir.mkdir(parents=True, exist_ok=True)
    configure: List[str] = [cmake, "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                            "-DKEYMESH_BUILD_TESTS=OFF", "-DKEYMESH_BUILD_BENCHMARKS=OFF",
                            "-DKEYMESH_BUILD_EXAMPLES=OFF", f"-DKEYMESH_PYTHON3={sys.executable}"]
    subprocess.run(configure, check=True)
    subprocess.run([cmake, "--build", str(build_dir), "--target", "keymesh", "keymesh_python", "-j2"], check=True)
    return build_dir


def native_build_dir(work: Path) -> Path:
    """$KEYMESH_BUILD_DIR, else a CMake build of the checkout in work/cmake."""
    given = os.environ.get("KEYMESH_BUILD_DIR")
    return Path(given).resolve() if given else cmake_build(work / "cmake")


def native_sources(build_dir: Path) -> Dict[str, Path]:
    """The files the package bundles, by their name in keymesh/, from build_dir."""
    sources = {LIBRARY: build_dir / "lib" / LIBRARY,
               native_name(): build_dir / "python" / "keymesh" / native_name()}
    missing = [str(p) for p in sources.values() if not p.is_file()]
    if missing:
        raise SystemExit("keymesh: not built: " + ", ".join(missing)
                         + " (build the CMake targets keymesh and keymesh_python there)")
    return {name: p.resolve() for name, p in sources.items()}  # the soname link's target


class BuildPyWithNative(build_py):
    """build_py, plus the library and the extension copied into the package."""

    def run(self) -> None:
        super().run()
        work = Path(self.get_finalized_command("build").build_temp).resolve()
        target = Path(self.build_lib) / "keymesh"
        target.mkdir(parents=True, exist_ok=True)
        for name, source in native_sources(native_build_dir(work)).items():
            shutil.copy2(source, target / name)


class BinaryDistribution(Distribution):
    """A wheel for this platform and interpreter (it carries native code)."""

    def has_ext_modules(self) -> bool:
        return True


if __name__ == "__main__":  # setuptools runs this file as a script; _keymesh_build imports its helpers
    setup(version=version(), cmdclass={"build_py": BuildPyWithNative}, distclass=BinaryDistribution)
