"""The PEP 517 build backend of the keymesh package (pyproject.toml).

Why not setuptools.build_meta alone: its build_wheel needs the `wheel`
package (bdist_wheel), which a fresh `python3 -m venv` does not have, and
`pip install --no-build-isolation --no-index` must work offline there. A
wheel is a zip with three metadata files, so this backend writes it itself:
the package's .py/.pyi/py.typed files, plus libkeymesh.so.0 and the
extension keymesh._native that setup.py's helpers build with CMake (or copy
from $KEYMESH_BUILD_DIR). The sdist is setuptools'.
"""
from __future__ import annotations

import base64
import hashlib
import os
import sys
import sysconfig
import tempfile
import tomllib
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import setup as _setup  # noqa: E402  (the helpers; setup() runs only as a script)

PACKAGE = "keymesh"
PACKAGE_FILES = (".py", ".pyi")


def _project() -> Dict[str, Any]:
    with open(HERE / "pyproject.toml", "rb") as f:
        project: Dict[str, Any] = tomllib.load(f)["project"]
    return project


def _metadata(version: str) -> str:
    p = _project()
    lines = ["Metadata-Version: 2.1", f"Name: {p['name']}", f"Version: {version}"]
    if "description" in p:
        lines.append(f"Summary: {p['description']}")
    if "requires-python" in p:
        lines.append(f"Requires-Python: {p['requires-python']}")
    for c in p.get("classifiers", []):
        lines.append(f"Classifier: {c}")
    for extra, reqs in sorted(p.get("optional-dependencies", {}).items()):
        lines.append(f"Provides-Extra: {extra}")
        lines.extend(f'Requires-Dist: {r} ; extra == "{extra}"' for r in reqs)
    return "\n".join(lines) + "\n"


def _tag() -> str:
    impl = f"cp{sys.version_info.major}{sys.version_info.minor}"
    platform = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    return f"{impl}-{impl}-{platform}"


def _package_files() -> List[Tuple[str, Path]]:
    out = []
    for path in sorted((HERE / PACKAGE).rglob("*")):
        if "__pycache__" in path.parts or not path.is_file():
            continue
        if path.suffix in PACKAGE_FILES or path.name == "py.typed":
            out.append((path.relative_to(HERE).as_posix(), path))
    return out


def _native_files(work: Path) -> List[Tuple[str, Path]]:
    build_dir = _setup.native_build_dir(work)
    return [(f"{PACKAGE}/{name}", source) for name, source in _setup.native_sources(build_dir).items()]


def _record_line(arcname: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{arcname},sha256={digest},{len(data)}"


# ---- PEP 517 hooks ------------------------------------------------------------

def get_requires_for_build_wheel(config_settings: Optional[Dict[str, Any]] = None) -> List[str]:
    return []


def build_wheel(wheel_directory: str, config_settings: Optional[Dict[str, Any]] = None,
                metadata_directory: Optional[str] = None) -> str:
    version = _setup.version()
    name = f"{PACKAGE}-{version}-{_tag()}.whl"
    dist_info = f"{PACKAGE}-{version}.dist-info"
    with tempfile.TemporaryDirectory(prefix="keymesh-wheel-") as work:
        files = _package_files() + _native_files(Path(work))
        record: List[str] = []
        out = Path(wheel_directory) / name
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for arcname, path in files:
                data = path.read_bytes()
                info = zipfile.ZipInfo(arcname, date_time=(2020, 1, 1, 0, 0, 0))
                info.external_attr = (0o755 if os.access(path, os.X_OK) else 0o644) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                z.writestr(info, data)
                record.append(_record_line(arcname, data))
            meta = {
                "METADATA": _metadata(version),
                "WHEEL": f"Wheel-Version: 1.0\nGenerator: keymesh _keymesh_build\nRoot-Is-Purelib: false\n"
                         f"Tag: {_tag()}\n",
                "top_level.txt": PACKAGE + "\n",
            }
            for fname, text in meta.items():
                arcname = f"{dist_info}/{fname}"
                z.writestr(arcname, text)
                record.append(_record_line(arcname, text.encode()))
            record.append(f"{dist_info}/RECORD,,")
            z.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return name


def get_requires_for_build_sdist(config_settings: Optional[Dict[str, Any]] = None) -> List[str]:
    return []


def build_sdist(sdist_directory: str, config_settings: Optional[Dict[str, Any]] = None) -> str:
    from setuptools import build_meta  # noqa: PLC0415

    name: str = build_meta.build_sdist(sdist_directory, config_settings)
    return name
