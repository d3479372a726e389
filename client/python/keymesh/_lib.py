"""libkeymesh.so through ctypes, and the extension module over the same copy.

Internal (include/keymesh/keymesh.h is the contract mirrored here; the
numbers are checked against the library by tests/python/test_abi.py). The
objects built on it are in _core.py.

Two bindings of one loaded library: the hot path (acquire, poll, the
outcome calls and the Key object) is the C extension module
keymesh._native; every cold call (create, connect, status, add_key, the
admin calls, header parsing) is ctypes, here. The library is loaded first,
by ctypes; the extension's DT_NEEDED libkeymesh.so.0 then resolves to that
copy (the loader matches the soname), and load() checks it did, so both
bindings share one copy of the library's per-process state.

Library lookup: $KEYMESH_LIB (explicit: no fallback), else the
libkeymesh.so.0 bundled in this package (an installed package), else
build/lib/libkeymesh.so of the checkout this package lives in, else the
system library path. The extension: the package's own _native (installed),
else build/python/keymesh/ beside the loaded library's build/lib/, else the
checkout's build/python/keymesh/.

ctypes releases the GIL around every foreign call; the extension releases
it around the calls that may block (an acquire that waits).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, List, Optional, Tuple

from . import exceptions as exc

# ---- Numbers (keymesh.h) -------------------------------------------------

# Status codes (KM_*, == keymesh::Code) and their km_code_name() names.
OK = 0
NO_AVAILABLE_KEY = 1
KEY_EXHAUSTED = 2
UNKNOWN_KEY = 3
NOT_HELD = 4
CAPACITY_EXCEEDED = 5
INVALID_ARGUMENT = 6
LAYOUT_MISMATCH = 7
SEGMENT_ERROR = 8
BROKER_UNAVAILABLE = 9
PROTOCOL_ERROR = 10
PERMISSION_DENIED = 11
IO_ERROR = 12
CORRUPT_STATE = 13
ALREADY_EXISTS = 14
CLOSED = 15
INTERNAL = 16
BUSY = 17

CODE_NAMES: Dict[int, str] = {
    OK: "ok", NO_AVAILABLE_KEY: "no_available_key", KEY_EXHAUSTED: "key_exhausted",
    UNKNOWN_KEY: "unknown_key", NOT_HELD: "not_held", CAPACITY_EXCEEDED: "capacity_exceeded",
    INVALID_ARGUMENT: "invalid_argument", LAYOUT_MISMATCH: "layout_mismatch", SEGMENT_ERROR: "segment_error",
    BROKER_UNAVAILABLE: "broker_unavailable", PROTOCOL_ERROR: "protocol_error",
    PERMISSION_DENIED: "permission_denied", IO_ERROR: "io_error", CORRUPT_STATE: "corrupt_state",
    ALREADY_EXISTS: "already_exists", CLOSED: "closed", INTERNAL: "internal", BUSY: "busy",
}

# Strategies (KM_ROUND_ROBIN..., == keymesh::Strategy), by StrategyName().
STRATEGY_CODES: Dict[str, int] = {"round_robin": 0, "least_busy": 1, "weighted": 2}

# Outcomes (KM_OUTCOME_*, == keymesh::OutcomeKind).
OUTCOME_SUCCESS = 0
OUTCOME_FAILURE = 1
OUTCOME_RATE_LIMITED = 2
OUTCOME_CANCELLED = 3

# Flags.
ACQUIRE_POLL = 1
END_PERMANENT = 1

# Sentinel doubles.
LATENCY_MEASURED = -1.0
LATENCY_NONE = -2.0
DEFAULT = -1.0

# ---- Structs ---------------------------------------------------------------
# Each begins with struct_size, set (with the defaults) by its *_init call.


class PoolOptions(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("strategy", ctypes.c_int32), ("max_failures", ctypes.c_uint32),
                ("default_cooldown", ctypes.c_double), ("acquire_timeout", ctypes.c_double),
                ("max_lease_seconds", ctypes.c_double), ("max_cooldown", ctypes.c_double),
                ("rate_margin", ctypes.c_double), ("max_leases_per_process", ctypes.c_uint32),
                ("reserved_v2", ctypes.c_uint32), ("burst", ctypes.c_uint32)]  # version 3 (py-surface)


class KeySpec(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("weight", ctypes.c_uint32), ("name", ctypes.c_char_p),
                ("secret", ctypes.c_char_p), ("max_concurrency", ctypes.c_uint32), ("rpm", ctypes.c_uint32),
                ("tpm", ctypes.c_uint64), ("burst", ctypes.c_uint32), ("rate_margin", ctypes.c_double)]


class AcquireOptions(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("timeout", ctypes.c_double),
                ("tokens", ctypes.c_uint64), ("cancel", ctypes.c_void_p)]


class EndOptions(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("outcome", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("latency", ctypes.c_double), ("tokens", ctypes.c_uint64), ("cooldown", ctypes.c_double)]


class Held(ctypes.Structure):
    _fields_ = [("secret", ctypes.c_char_p), ("name", ctypes.c_char_p), ("ticket", ctypes.c_uint64)]


# ---- Loading ---------------------------------------------------------------

_HERE = Path(__file__).resolve().parent
# The checkout root when this package is client/python/keymesh/ of one.
_ROOT = _HERE.parents[2] if len(_HERE.parents) > 2 else _HERE
BUNDLED = "libkeymesh.so.0"  # the library's soname: what _native links to


def _candidates() -> List[str]:
    out = []
    env = os.environ.get("KEYMESH_LIB")
    if env:
        out.append(env)
    out.append(str(_HERE / BUNDLED))  # installed: bundled next to _native
    out.append(str(_ROOT / "build" / "lib" / "libkeymesh.so"))
    found = ctypes.util.find_library("keymesh")
    if found:
        out.append(found)
    out.append("libkeymesh.so")
    return out


def _load() -> Tuple[ctypes.CDLL, str]:
    env = os.environ.get("KEYMESH_LIB")
    if env:  # explicit: no silent fallback to another build
        try:
            return ctypes.CDLL(env), env
        except OSError as e:
            raise ImportError(f"keymesh: cannot load $KEYMESH_LIB={env}: {e}") from None
    errors = []
    for path in _candidates():
        if os.sep in path and not os.path.exists(path):
            errors.append(f"{path}: not found")
            continue
        try:
            return ctypes.CDLL(path), path
        except OSError as e:  # pragma: no cover - depends on the system
            errors.append(f"{path}: {e}")
    raise ImportError("keymesh: cannot load libkeymesh.so (set $KEYMESH_LIB or build the checkout): "
                      + "; ".join(errors))


def _native_candidates(lib_path: str) -> List[Path]:
    """Where keymesh._native may be when it is not in the package itself."""
    dirs = []
    if os.sep in lib_path:  # <build>/lib/libkeymesh.so -> <build>/python/keymesh/
        dirs.append(Path(os.path.abspath(lib_path)).parent.parent / "python" / "keymesh")
    dirs.append(_ROOT / "build" / "python" / "keymesh")
    return [d / ("_native" + suffix) for d in dirs for suffix in importlib.machinery.EXTENSION_SUFFIXES]


def _load_native(lib_path: str) -> ModuleType:
    """keymesh._native, loaded after the library (so it links to that copy)."""
    name = __package__ + "._native"
    if importlib.util.find_spec(name) is not None:  # installed: next to this file
        module = importlib.import_module(name)
    else:
        tried = _native_candidates(lib_path)
        path = next((p for p in tried if p.is_file()), None)
        if path is None:
            raise ImportError("keymesh: the extension module keymesh._native is not built (build the CMake "
                              "target keymesh_python, or pip install the package); looked for "
                              + ", ".join(str(p) for p in tried))
        loader = importlib.machinery.ExtensionFileLoader(name, str(path))
        spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        loader.exec_module(module)
    ours = ctypes.cast(lib.km_version, ctypes.c_void_p).value
    if module.library_address() != ours:
        raise ImportError(f"keymesh: {module.__file__} uses another copy of libkeymesh.so than {lib_path} "
                          "(its soname must be libkeymesh.so.0, and it must be loaded first)")
    return module


lib, LIB_PATH = _load()

_P = ctypes.c_void_p
_PP = ctypes.POINTER(ctypes.c_void_p)
_u32p = ctypes.POINTER(ctypes.c_uint32)
_dp = ctypes.POINTER(ctypes.c_double)
_str = ctypes.c_char_p


def _sig(name: str, *argtypes: Any, restype: Any = ctypes.c_int) -> Any:
    fn = getattr(lib, name)
    fn.argtypes = list(argtypes)
    fn.restype = restype
    return fn


km_last_error = _sig("km_last_error", restype=_str)
km_code_name = _sig("km_code_name", ctypes.c_int, restype=_str)
km_version = _sig("km_version", ctypes.POINTER(_str))
km_string_free = _sig("km_string_free", _P)
km_pool_options_init = _sig("km_pool_options_init", ctypes.POINTER(PoolOptions))
km_key_spec_init = _sig("km_key_spec_init", ctypes.POINTER(KeySpec))
km_acquire_options_init = _sig("km_acquire_options_init", ctypes.POINTER(AcquireOptions))
km_end_options_init = _sig("km_end_options_init", ctypes.POINTER(EndOptions))
km_pool_create = _sig("km_pool_create", ctypes.POINTER(KeySpec), ctypes.c_size_t, ctypes.POINTER(PoolOptions), _PP)
km_pool_connect = _sig("km_pool_connect", _str, _str, _PP)
km_pool_close = _sig("km_pool_close", _P)
km_pool_destroy = _sig("km_pool_destroy", _P)
km_pool_acquire_key_ex = _sig("km_pool_acquire_key_ex", _P, ctypes.POINTER(AcquireOptions), ctypes.POINTER(Held))
km_pool_end_key = _sig("km_pool_end_key", _P, _str, ctypes.c_uint64, ctypes.POINTER(EndOptions))
km_pool_held_count = _sig("km_pool_held_count", _P, _str, _u32p)
km_pool_observe_limits = _sig("km_pool_observe_limits", _P, _str, ctypes.POINTER(_str), ctypes.POINTER(_str),
                              ctypes.c_size_t)
km_parse_retry_after = _sig("km_parse_retry_after", _str, _dp)
km_parse_duration = _sig("km_parse_duration", _str, _dp)
km_cancel_create = _sig("km_cancel_create", _P, _PP)
km_cancel_trigger = _sig("km_cancel_trigger", _P)
km_cancel_destroy = _sig("km_cancel_destroy", _P)
km_pool_add_key = _sig("km_pool_add_key", _P, ctypes.POINTER(KeySpec))
km_pool_remove_key = _sig("km_pool_remove_key", _P, _str)
km_pool_enable_key = _sig("km_pool_enable_key", _P, _str)
km_pool_disable_key = _sig("km_pool_disable_key", _P, _str)
km_pool_reset_key = _sig("km_pool_reset_key", _P, _str)
km_pool_key_name = _sig("km_pool_key_name", _P, _str, _PP)
km_pool_status_json = _sig("km_pool_status_json", _P, _PP)
km_pool_available_count = _sig("km_pool_available_count", _P, _u32p)
km_pool_reclaim_dead = _sig("km_pool_reclaim_dead", _P, _u32p)
km_broker_reclaim = _sig("km_broker_reclaim", _str, ctypes.c_int32, _u32p)

# The admin calls that take a key name, by the pools' method names.
KEY_OPS = {"remove_key": km_pool_remove_key, "enable_key": km_pool_enable_key,
           "disable_key": km_pool_disable_key, "reset_key": km_pool_reset_key}


def init(struct_type: Any) -> Any:
    """A struct of `struct_type` filled by its *_init call (size and defaults)."""
    s = struct_type()
    rc = _INITS[struct_type](ctypes.byref(s))
    if rc != OK:  # pragma: no cover - only with a NULL pointer
        raise error(rc)
    return s


_INITS = {PoolOptions: km_pool_options_init, KeySpec: km_key_spec_init,
          AcquireOptions: km_acquire_options_init, EndOptions: km_end_options_init}

# ---- Errors ----------------------------------------------------------------


def version() -> str:
    """The library's version (km_version): the package's __version__."""
    out = ctypes.c_char_p()
    check(km_version(ctypes.byref(out)))
    return (out.value or b"").decode()


def mask_secret(secret: str) -> str:
    """'...' + the last 4 characters, and only for secrets of 12+ characters."""
    return "..." + secret[-4:] if len(secret) >= 12 else "***"


def last_error() -> str:
    return (km_last_error() or b"").decode("utf-8", "replace")


_ERRORS = {
    NO_AVAILABLE_KEY: exc.NoAvailableKeyError,
    KEY_EXHAUSTED: exc.KeyExhaustedError,
    UNKNOWN_KEY: exc.UnknownKeyError,
    NOT_HELD: exc.KeyNotHeldError,
    CAPACITY_EXCEEDED: exc.CapacityError,
    INVALID_ARGUMENT: exc.ConfigError,
    BROKER_UNAVAILABLE: exc.BrokerUnavailableError,
    PROTOCOL_ERROR: exc.ProtocolError,
    CLOSED: exc.PoolClosedError,
    BUSY: exc.KeyMeshError,  # a pool lock held past the lock timeout: the base class, code == BUSY
}


def error(rc: int, key: Optional[bytes] = None, key_name: Optional[str] = None) -> exc.KeyMeshError:
    """The exception for status `rc` of the call that just failed on this thread."""
    cls = _ERRORS.get(rc, exc.KeyMeshError)
    message = last_error() or (km_code_name(rc) or b"error").decode()
    masked = mask_secret(key.decode("utf-8", "replace")) if key is not None else None
    err: exc.KeyMeshError = cls(message, code=rc, key=masked, key_name=key_name)
    return err


def check(rc: int, key: Optional[bytes] = None, key_name: Optional[str] = None) -> None:
    """Raises error(rc, ...) unless rc is OK."""
    if rc != OK:
        raise error(rc, key, key_name)


def encode(value: Any, what: str) -> bytes:
    """`value` (str or bytes) as the C string the library takes."""
    if isinstance(value, bytes):
        raw = value
    elif isinstance(value, str):
        raw = value.encode("utf-8")
    else:
        raise exc.ConfigError(f"{what} must be a str, not {type(value).__name__}")
    if b"\0" in raw:
        raise exc.ConfigError(f"{what} must not contain NUL characters")
    return raw


# The hot path: loaded last, after `lib` and the error factory it raises through.
native = _load_native(LIB_PATH)
native._setup(error, exc.ConfigError)
