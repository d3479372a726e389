"""The package installs with pip into a fresh venv, offline, and works there
from outside the checkout with neither PYTHONPATH nor KEYMESH_LIB: an
embedded pool used by a forked child, and an attached pool against a
throwaway keymesh-broker.

pip builds from $KEYMESH_BUILD_DIR (the ctest build directory, or the one
KEYMESH_LIB's library lives in), so the native parts are copied, not built
a second time.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, Broker, broker_available, secret

SCRIPT = textwrap.dedent('''
    import json, os, sys
    import keymesh
    from keymesh import _lib

    here = os.path.dirname(keymesh.__file__)
    # Everything native comes from the installed package itself.
    assert here.startswith(sys.prefix + os.sep), here
    assert _lib.LIB_PATH == os.path.join(here, "libkeymesh.so.0"), _lib.LIB_PATH
    assert os.path.dirname(_lib.native.__file__) == here, _lib.native.__file__
    assert os.path.isfile(os.path.join(here, "py.typed"))

    secrets = json.loads(sys.argv[2])
    pool = keymesh.SyncKeyPool([("a", secrets[0]), ("b", secrets[1])])
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child uses the pool created before the fork
        code = 1
        try:
            os.close(r)
            key = pool.acquire(timeout=5)
            os.write(w, key.name.encode())
            pool.release(key, latency=0.01)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    name = os.read(r, 100).decode()
    _, status = os.waitpid(pid, 0)
    assert status == 0, status
    done = {k["name"]: k["success_count"] for k in pool.status()["keys"]}
    assert done[name] == 1 and sum(done.values()) == 1, done
    pool.close()

    attached = keymesh.SyncKeyPool.connect("test", socket=sys.argv[1])
    with attached.lease(timeout=5) as key:
        assert key == secrets[2] and key.name == "key-1", repr(key)
    assert attached.status()["keys"][0]["success_count"] == 1
    attached.close()
    print("installed keymesh", keymesh.__version__, "ok")
''')


def build_dir() -> Path:
    given = os.environ.get("KEYMESH_BUILD_DIR")
    if given:
        return Path(given)
    lib = os.environ.get("KEYMESH_LIB")
    return Path(lib).resolve().parent.parent if lib else ROOT / "build"


def test_pip_install_into_a_fresh_venv() -> None:
    if not broker_available():
        pytest.fail("keymesh-broker not built: build it first (scripts/setup)")
    built = build_dir()
    tmp = Path(tempfile.mkdtemp(prefix="kmpy-install-"))
    broker = None
    try:
        venv = tmp / "venv"
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KEYMESH_LIB")}
        env.update(KEYMESH_BUILD_DIR=str(built), PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONDONTWRITEBYTECODE="1")
        pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-build-isolation",
                              "--no-index", "--no-cache-dir", str(ROOT / "client" / "python")],
                             env=env, cwd=tmp, capture_output=True, text=True, timeout=120)
        assert pip.returncode == 0, pip.stdout + pip.stderr
        broker = Broker([secret(3)], {})
        env.pop("KEYMESH_BUILD_DIR")
        run = subprocess.run([str(venv / "bin" / "python"), "-c", SCRIPT, broker.socket,
                              f'["{secret(1)}", "{secret(2)}", "{secret(3)}"]'],
                             env=env, cwd=tmp, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "ok" in run.stdout
        # Nothing of the build was left in the checkout.
        assert not (ROOT / "client" / "python" / "build").exists()
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)
