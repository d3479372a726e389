"""The Python package's copies of the C ABI's numbers agree with the library.

keymesh/_lib.py mirrors keymesh.h (codes, strategies, outcomes, struct
layouts); these tests ask the loaded libkeymesh.so itself: km_code_name()
for the codes, and the pool's own behaviour for strategies and outcomes.
"""
from __future__ import annotations

import ctypes

import pytest

import keymesh
from keymesh import _core, _lib
from keymesh import exceptions as exc

from conftest import secret


def test_code_table_matches_km_code_name():
    for code, name in _lib.CODE_NAMES.items():
        assert _lib.km_code_name(code).decode() == name
    # The table is the whole closed set: the next number is not a code.
    assert sorted(_lib.CODE_NAMES) == list(range(len(_lib.CODE_NAMES)))
    assert _lib.km_code_name(len(_lib.CODE_NAMES)).decode() == "unknown"
    assert _lib.km_code_name(-1).decode() == "unknown"
    # Every named constant of _lib is in the table under its own name.
    for code, name in _lib.CODE_NAMES.items():
        assert getattr(_lib, name.upper()) == code


def test_exception_codes():
    # Each exception class the package raises for a code carries that code.
    for code, cls in _lib._ERRORS.items():
        assert issubclass(cls, exc.KeyMeshError)
        err = _lib.error(code)
        assert type(err) is cls and err.code == code


@pytest.mark.parametrize("name,code", sorted(_lib.STRATEGY_CODES.items()))
def test_strategy_codes_are_the_librarys(name, code):
    spec = _core._spec(secret(1))
    opts = _lib.init(_lib.PoolOptions)
    opts.strategy = code
    handle = ctypes.c_void_p()
    _lib.check(_lib.km_pool_create(ctypes.byref(spec), 1, ctypes.byref(opts), ctypes.byref(handle)))
    core = _core.Core(handle, attached=False)
    try:
        assert core.status_raw()["strategy"] == name
        assert keymesh.SchedulerStrategy(name).value == name
    finally:
        core.close()
    opts.strategy = max(_lib.STRATEGY_CODES.values()) + 1
    rc = _lib.km_pool_create(ctypes.byref(spec), 1, ctypes.byref(opts), ctypes.byref(handle))
    assert rc == _lib.INVALID_ARGUMENT


def test_outcome_codes_count_as_their_outcome():
    pool = keymesh.SyncKeyPool([secret(1)], max_failures=100)
    core = pool._core
    counters = {_lib.OUTCOME_SUCCESS: "success_count", _lib.OUTCOME_FAILURE: "failure_count",
                _lib.OUTCOME_RATE_LIMITED: "rate_limited", _lib.OUTCOME_CANCELLED: "cancelled"}
    try:
        for outcome, counter in counters.items():
            before = pool.status()["keys"][0][counter]
            key = core.acquire(1.0)
            core._end(key, outcome, cooldown=0.0)
            after = pool.status()["keys"][0]
            assert after[counter] == before + 1, counter
        key = core.acquire(1.0)
        with pytest.raises(keymesh.ConfigError):
            core._end(key, max(counters) + 1)
        assert core.held_count() == 1  # the bad call left the lease held
        # A permanent flag only goes with a failure.
        with pytest.raises(keymesh.ConfigError):
            core._end(key, _lib.OUTCOME_SUCCESS, flags=_lib.END_PERMANENT)
        core.cancel(key)
    finally:
        pool.close()


def test_struct_layouts_and_defaults():
    # The sizes the library was built with are the ones _init writes.
    for struct in (_lib.PoolOptions, _lib.KeySpec, _lib.AcquireOptions, _lib.EndOptions):
        assert _lib.init(struct).struct_size == ctypes.sizeof(struct)
    o = _lib.init(_lib.PoolOptions)
    assert (o.strategy, o.default_cooldown, o.max_failures, o.acquire_timeout) == (1, 60.0, 10, 30.0)
    assert o.rate_margin == pytest.approx(0.02)
    k = _lib.init(_lib.KeySpec)
    assert (k.weight, k.burst, k.rate_margin) == (1, 0, _lib.DEFAULT)
    e = _lib.init(_lib.EndOptions)
    assert (e.outcome, e.latency, e.cooldown) == (_lib.OUTCOME_SUCCESS, _lib.LATENCY_MEASURED, _lib.DEFAULT)
    a = _lib.init(_lib.AcquireOptions)
    assert (a.flags, a.timeout, a.tokens) == (0, _lib.DEFAULT, 0)
    # A struct the library does not know the size of is refused.
    spec = _core._spec(secret(2))
    spec.struct_size = 0
    handle = ctypes.c_void_p()
    assert _lib.km_pool_create(ctypes.byref(spec), 1, None, ctypes.byref(handle)) == _lib.INVALID_ARGUMENT
    assert "km_key_spec" in _lib.last_error()


def test_version():
    out = ctypes.c_char_p()
    assert _lib.km_version(ctypes.byref(out)) == _lib.OK
    assert out.value.decode() == keymesh.__version__
