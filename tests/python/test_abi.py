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


def _end(core, key, outcome, *, cooldown=_lib.DEFAULT, flags=0):
    """km_pool_end_key through ctypes, with _lib's EndOptions and numbers."""
    opts = _lib.init(_lib.EndOptions)
    opts.outcome, opts.cooldown, opts.flags, opts.latency = outcome, cooldown, flags, _lib.LATENCY_NONE
    _lib.check(_lib.km_pool_end_key(core.handle, key._km_raw, key._km_ticket, ctypes.byref(opts)))


def test_outcome_codes_count_as_their_outcome():
    pool = keymesh.SyncKeyPool([secret(1)], max_failures=100)
    core = pool._core
    counters = {_lib.OUTCOME_SUCCESS: "success_count", _lib.OUTCOME_FAILURE: "failure_count",
                _lib.OUTCOME_RATE_LIMITED: "rate_limited", _lib.OUTCOME_CANCELLED: "cancelled"}
    try:
        for outcome, counter in counters.items():
            before = pool.status()["keys"][0][counter]
            key = core.acquire(1.0)
            _end(core, key, outcome, cooldown=0.0)
            after = pool.status()["keys"][0]
            assert after[counter] == before + 1, counter
        key = core.acquire(1.0)
        with pytest.raises(keymesh.ConfigError):
            _end(core, key, max(counters) + 1)
        assert core.held_count() == 1  # the bad call left the lease held
        # A permanent flag only goes with a failure.
        with pytest.raises(keymesh.ConfigError):
            _end(core, key, _lib.OUTCOME_SUCCESS, flags=_lib.END_PERMANENT)
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


def test_one_library_for_both_bindings():
    # The extension (hot path) and ctypes (cold calls) use one loaded copy of
    # libkeymesh.so, so a handle and a lease made by one are the other's.
    assert _lib.native.library_address() == ctypes.cast(_lib.lib.km_version, ctypes.c_void_p).value
    specs = (_lib.KeySpec * 2)(_core._spec(secret(1)), _core._spec(secret(2)))
    handle = ctypes.c_void_p()
    _lib.check(_lib.km_pool_create(specs, 2, None, ctypes.byref(handle)))  # made by ctypes
    native = _lib.native.Pool(handle.value)  # owned and used by the extension from here on
    try:
        key = native.acquire(1.0)
        n = ctypes.c_uint32()
        _lib.check(_lib.km_pool_held_count(handle, None, ctypes.byref(n)))
        assert n.value == 1  # ctypes sees the extension's lease
        opts = _lib.init(_lib.EndOptions)
        _lib.check(_lib.km_pool_end_key(handle, key._km_raw, key._km_ticket, ctypes.byref(opts)))
        with pytest.raises(keymesh.KeyNotHeldError):  # ended through ctypes: not held for the extension
            native.release(key)
        # A lease acquired through ctypes is ended by the extension (a plain str: the oldest held).
        held = _lib.Held()
        acq = _lib.init(_lib.AcquireOptions)
        _lib.check(_lib.km_pool_acquire_key_ex(handle, ctypes.byref(acq), ctypes.byref(held)))
        native.release(held.secret.decode(), 0.25)
        # And one made a Key (Key._of: by its ticket) is ended exactly once.
        _lib.check(_lib.km_pool_acquire_key_ex(handle, ctypes.byref(acq), ctypes.byref(held)))
        key = _core.Key._of(held)
        assert key == held.secret.decode() and key._km_ticket == held.ticket and key.name == held.name.decode()
        native.cancel(key)
        with pytest.raises(keymesh.KeyNotHeldError):
            native.cancel(key)
        _lib.check(_lib.km_pool_held_count(handle, None, ctypes.byref(n)))
        assert n.value == 0
    finally:
        _lib.km_pool_close(handle)
        del native  # km_pool_destroy


def test_key_object():
    pool = keymesh.SyncKeyPool([("first", secret(1))])
    try:
        key = pool.acquire()
        assert isinstance(key, str) and key == secret(1) and hash(key) == hash(secret(1))
        assert type(key) is _core.Key and key.name == "first" and key._km_ticket > 0
        assert key._km_raw == secret(1).encode()
        assert repr(key) == f"<keymesh key 'first' ...{secret(1)[-4:]}>"
        assert secret(1) not in repr(key) and secret(1) not in repr([key])
        import copy
        import pickle
        for twin in (copy.copy(key), pickle.loads(pickle.dumps(key))):
            assert type(twin) is str and twin == key  # a copy is not the lease
        with pytest.raises(AttributeError):
            key.name = "other"  # type: ignore[misc]
        pool.release(key)
        with pytest.raises(keymesh.KeyNotHeldError) as e:
            pool.release(key)  # the same lease twice
        assert e.value.key_name == "first" and secret(1) not in str(e.value)
        short = keymesh.SyncKeyPool(["sk-short"])
        k = short.acquire()
        assert repr(k) == "<keymesh key 'key-1' ***>"
        short.release(k)
        short.close()
    finally:
        pool.close()


def test_hot_path_arguments_are_checked():
    pool = keymesh.SyncKeyPool([secret(1)])
    native = pool._core.native
    try:
        with pytest.raises(TypeError):
            native.acquire(1.0, 0, None, 4)
        with pytest.raises(keymesh.ConfigError, match="timeout"):
            native.acquire("1")
        with pytest.raises(keymesh.ConfigError, match="key must be a str"):
            pool.release(42)  # type: ignore[arg-type]
        with pytest.raises(keymesh.ConfigError, match="NUL"):
            pool.release("sk\0x")
        with pytest.raises(keymesh.UnknownKeyError):
            pool.release("sk-not-in-this-pool")
        key = pool.acquire(tokens=3.0)  # an integral float is taken
        with pytest.raises(keymesh.ConfigError, match="cooldown"):
            pool.mark_rate_limited(key, float("nan"))
        pool.mark_rate_limited(key, 0.0)
    finally:
        pool.close()
