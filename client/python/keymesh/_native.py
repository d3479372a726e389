"""ctypes binding of libkeymesh.so's C ABI (include/keymesh/keymesh.h).

Internal: the public API is SyncKeyPool / KeyPool. ``Core`` owns one
km_pool handle and is shared by both pool classes.

Library lookup: $KEYMESH_LIB, else build/lib/libkeymesh.so of the checkout
this package lives in, else the system library path.

ctypes releases the GIL around every foreign call, so a blocking acquire
lets other Python threads run.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import threading
import weakref
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from . import exceptions as exc

# Status codes (keymesh.h).
OK = 0
NO_AVAILABLE_KEY = 1
KEY_EXHAUSTED = 2
UNKNOWN_KEY = 3
NOT_HELD = 4
CAPACITY_EXCEEDED = 5
INVALID_ARGUMENT = 6
BROKER_UNAVAILABLE = 9
PROTOCOL_ERROR = 10
CLOSED = 15

LATENCY_MEASURED = -1.0
LATENCY_NONE = -2.0
DEFAULT = -1.0

_STRATEGY_CODES = {"round_robin": 0, "least_busy": 1, "weighted": 2}


# Size-prefixed (keymesh.h): struct_size and the defaults come from the
# km_*_init calls.
class _PoolOptions(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("strategy", ctypes.c_int32), ("max_failures", ctypes.c_uint32),
                ("default_cooldown", ctypes.c_double), ("acquire_timeout", ctypes.c_double),
                ("max_lease_seconds", ctypes.c_double), ("max_cooldown", ctypes.c_double),
                ("rate_margin", ctypes.c_double)]


class _KeySpec(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("weight", ctypes.c_uint32), ("name", ctypes.c_char_p),
                ("secret", ctypes.c_char_p), ("max_concurrency", ctypes.c_uint32), ("rpm", ctypes.c_uint32),
                ("tpm", ctypes.c_uint64), ("burst", ctypes.c_uint32), ("rate_margin", ctypes.c_double)]


class _Held(ctypes.Structure):
    _fields_ = [("secret", ctypes.c_char_p), ("name", ctypes.c_char_p), ("ticket", ctypes.c_uint64)]


def _candidates() -> List[str]:
    out = []
    env = os.environ.get("KEYMESH_LIB")
    if env:
        out.append(env)
    # client/python/keymesh/_native.py -> checkout root is three levels up.
    root = Path(__file__).resolve().parents[3]
    out.append(str(root / "build" / "lib" / "libkeymesh.so"))
    found = ctypes.util.find_library("keymesh")
    if found:
        out.append(found)
    out.append("libkeymesh.so")
    return out


def _load() -> ctypes.CDLL:
    env = os.environ.get("KEYMESH_LIB")
    if env:  # explicit: no silent fallback to another build
        try:
            return ctypes.CDLL(env)
        except OSError as e:
            raise ImportError(f"keymesh: cannot load $KEYMESH_LIB={env}: {e}") from None
    errors = []
    for path in _candidates():
        if os.sep in path and not os.path.exists(path):
            errors.append(f"{path}: not found")
            continue
        try:
            return ctypes.CDLL(path)
        except OSError as e:  # pragma: no cover - depends on the system
            errors.append(f"{path}: {e}")
    raise ImportError("keymesh: cannot load libkeymesh.so (set $KEYMESH_LIB or build the checkout): "
                      + "; ".join(errors))


_lib = _load()

_P = ctypes.c_void_p
_u32p = ctypes.POINTER(ctypes.c_uint32)


def _sig(name: str, *argtypes: Any, restype: Any = ctypes.c_int) -> Any:
    fn = getattr(_lib, name)
    fn.argtypes = list(argtypes)
    fn.restype = restype
    return fn


km_last_error = _sig("km_last_error", restype=ctypes.c_char_p)
km_code_name = _sig("km_code_name", ctypes.c_int, restype=ctypes.c_char_p)
km_string_free = _sig("km_string_free", ctypes.c_void_p)
km_pool_options_init = _sig("km_pool_options_init", ctypes.POINTER(_PoolOptions))
km_key_spec_init = _sig("km_key_spec_init", ctypes.POINTER(_KeySpec))
km_pool_create = _sig("km_pool_create", ctypes.POINTER(_KeySpec), ctypes.c_size_t,
                      ctypes.POINTER(_PoolOptions), ctypes.POINTER(_P))
km_pool_connect = _sig("km_pool_connect", ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(_P))
km_pool_close = _sig("km_pool_close", _P)
km_pool_destroy = _sig("km_pool_destroy", _P)
km_pool_acquire_key = _sig("km_pool_acquire_key", _P, ctypes.c_double, _P, ctypes.POINTER(_Held))
km_pool_poll_key = _sig("km_pool_poll_key", _P, ctypes.POINTER(_Held))
km_pool_release_key = _sig("km_pool_release_key", _P, ctypes.c_char_p, ctypes.c_uint64, ctypes.c_double,
                           ctypes.c_uint64)
km_pool_mark_failed_key = _sig("km_pool_mark_failed_key", _P, ctypes.c_char_p, ctypes.c_uint64)
km_pool_mark_rate_limited_key = _sig("km_pool_mark_rate_limited_key", _P, ctypes.c_char_p, ctypes.c_uint64,
                                     ctypes.c_double)
km_pool_cancel_key = _sig("km_pool_cancel_key", _P, ctypes.c_char_p, ctypes.c_uint64)
km_pool_held_count = _sig("km_pool_held_count", _P, ctypes.c_char_p, _u32p)
km_cancel_create = _sig("km_cancel_create", _P, ctypes.POINTER(_P))
km_cancel_trigger = _sig("km_cancel_trigger", _P)
km_cancel_destroy = _sig("km_cancel_destroy", _P)
km_pool_add_key = _sig("km_pool_add_key", _P, ctypes.POINTER(_KeySpec))
km_pool_remove_key = _sig("km_pool_remove_key", _P, ctypes.c_char_p)
km_pool_enable_key = _sig("km_pool_enable_key", _P, ctypes.c_char_p)
km_pool_disable_key = _sig("km_pool_disable_key", _P, ctypes.c_char_p)
km_pool_reset_key = _sig("km_pool_reset_key", _P, ctypes.c_char_p)
km_pool_key_name = _sig("km_pool_key_name", _P, ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p))
km_pool_status_json = _sig("km_pool_status_json", _P, ctypes.POINTER(ctypes.c_void_p))
km_pool_available_count = _sig("km_pool_available_count", _P, _u32p)
km_pool_reclaim_dead = _sig("km_pool_reclaim_dead", _P, _u32p)
km_broker_reclaim = _sig("km_broker_reclaim", ctypes.c_char_p, ctypes.c_int32, _u32p)
km_pool_acquire_key_tokens = _sig("km_pool_acquire_key_tokens", _P, ctypes.c_double, ctypes.c_uint64, _P,
                                  ctypes.POINTER(_Held))
km_pool_poll_key_tokens = _sig("km_pool_poll_key_tokens", _P, ctypes.c_uint64, ctypes.POINTER(_Held))
km_pool_mark_failed_key_permanent = _sig("km_pool_mark_failed_key_permanent", _P, ctypes.c_char_p, ctypes.c_uint64)
km_pool_observe_limits = _sig("km_pool_observe_limits", _P, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p),
                              ctypes.POINTER(ctypes.c_char_p), ctypes.c_size_t)
km_parse_retry_after = _sig("km_parse_retry_after", ctypes.c_char_p, ctypes.POINTER(ctypes.c_double))
km_parse_duration = _sig("km_parse_duration", ctypes.c_char_p, ctypes.POINTER(ctypes.c_double))


def parse_retry_after(value: str) -> float:
    """Seconds from now that a Retry-After value (delay-seconds or an
    HTTP-date) asks for. ConfigError (a ValueError) when malformed."""
    out = ctypes.c_double()
    rc = km_parse_retry_after(_encode(value, "Retry-After"), ctypes.byref(out))
    if rc != OK:
        raise error(rc)
    return out.value


def parse_duration(value: str) -> float:
    """Seconds of a Go-style duration as in x-ratelimit-reset-* ("1s", "6m0s",
    "250ms"). ConfigError (a ValueError) when malformed."""
    out = ctypes.c_double()
    rc = km_parse_duration(_encode(value, "duration"), ctypes.byref(out))
    if rc != OK:
        raise error(rc)
    return out.value


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
}


def error(rc: int, key: Optional[bytes] = None, key_name: Optional[str] = None) -> exc.KeyMeshError:
    cls = _ERRORS.get(rc, exc.KeyMeshError)
    message = last_error() or (km_code_name(rc) or b"error").decode()
    masked = mask_secret(key.decode("utf-8", "replace")) if key is not None else None
    return cls(message, code=rc, key=masked, key_name=key_name)


def _encode(value: Any, what: str) -> bytes:
    if isinstance(value, bytes):
        raw = value
    elif isinstance(value, str):
        raw = value.encode("utf-8")
    else:
        raise exc.ConfigError(f"{what} must be a str, not {type(value).__name__}")
    if b"\0" in raw:
        raise exc.ConfigError(f"{what} must not contain NUL characters")
    return raw


class Key(str):
    """The key string acquire() returns. A plain ``str`` (use it anywhere),
    that also remembers which lease it is, so releasing it twice is an error
    rather than a release of another holder's lease. Its repr is masked.
    """

    def __repr__(self) -> str:
        return f"<keymesh key {self.name!r} {mask_secret(self)}>"


def _key_args(key: Any) -> Tuple[bytes, int]:
    if type(key) is Key:
        return key._km_raw, key._km_ticket  # type: ignore[attr-defined]
    return _encode(key, "key"), 0


class CancelToken:
    """Ends one km_pool_acquire_key wait from another thread."""

    __slots__ = ("_core", "_handle", "__weakref__")

    def __init__(self, core: "Core") -> None:
        handle = _P()
        rc = km_cancel_create(core.handle, ctypes.byref(handle))
        if rc != OK:
            raise error(rc)
        self._core = core  # keeps the km_pool alive while the token lives
        self._handle = handle

    def trigger(self) -> None:
        km_cancel_trigger(self._handle)

    def __del__(self) -> None:
        h, self._handle = self._handle, None
        if h:
            km_cancel_destroy(h)


# Live pools, for the gunicorn/uwsgi hooks.
live_cores: "weakref.WeakSet[Core]" = weakref.WeakSet()


class Core:
    """One km_pool handle and the operations both pool classes share."""

    def __init__(self, handle: _P, *, attached: bool, socket: Optional[str] = None) -> None:
        self.handle = handle
        self.attached = attached
        self.socket = socket
        self.closed = False
        self._tokens: "weakref.WeakSet[CancelToken]" = weakref.WeakSet()
        self._tokens_lock = threading.Lock()
        live_cores.add(self)

    # ---- construction -------------------------------------------------
    @classmethod
    def create(cls, keys: Iterable[Any], *, strategy: str, default_cooldown: float, max_failures: int,
               acquire_timeout: float, owner: str) -> "Core":
        if isinstance(keys, (str, bytes)):
            raise exc.ConfigError(f"{owner} expects a sequence of API keys, not a single string")
        specs = [_spec(k) for k in keys]
        if not specs:
            raise exc.ConfigError(f"{owner} requires at least one API key.")
        opts = _PoolOptions()
        km_pool_options_init(ctypes.byref(opts))
        opts.strategy = _STRATEGY_CODES[strategy]
        try:
            opts.default_cooldown = float(default_cooldown)
            opts.max_failures = int(max_failures)
            opts.acquire_timeout = float(acquire_timeout)
        except (TypeError, ValueError, OverflowError) as e:
            raise exc.ConfigError(f"invalid pool option: {e}") from None
        if int(max_failures) < 1:
            raise exc.ConfigError("max_failures must be >= 1")
        arr = (_KeySpec * len(specs))(*[s for s, _ in specs])
        handle = _P()
        rc = km_pool_create(arr, len(specs), ctypes.byref(opts), ctypes.byref(handle))
        if rc != OK:
            raise error(rc)
        return cls(handle, attached=False)

    @classmethod
    def connect(cls, pool: str, socket: Optional[str]) -> "Core":
        handle = _P()
        rc = km_pool_connect(_encode(socket, "socket") if socket else None, _encode(pool, "pool"),
                             ctypes.byref(handle))
        if rc != OK:
            raise error(rc)
        return cls(handle, attached=True, socket=socket)

    # ---- acquire ------------------------------------------------------
    @staticmethod
    def _key(held: _Held) -> Key:
        raw = held.secret
        k = Key(raw.decode("utf-8", "surrogateescape"))
        k._km_raw = raw
        k._km_ticket = held.ticket
        k.name = held.name.decode("utf-8", "replace")
        return k

    def acquire(self, timeout: Optional[float], token: Optional[CancelToken] = None, tokens: int = 0) -> Key:
        held = _Held()
        t = DEFAULT if timeout is None else _seconds(timeout, "timeout")
        if tokens:
            n = int(tokens)
            if n < 0:
                raise exc.ConfigError("tokens must be >= 0")
            rc = km_pool_acquire_key_tokens(self.handle, t, n, token._handle if token is not None else None,
                                            ctypes.byref(held))
        else:
            rc = km_pool_acquire_key(self.handle, t, token._handle if token is not None else None,
                                     ctypes.byref(held))
        if rc != OK:
            raise error(rc)
        return self._key(held)

    def acquire_rc(self, timeout: Optional[float], token: Optional[CancelToken], tokens: int = 0) -> Tuple[int, Any]:
        """As acquire, but returns (rc, Key or error) instead of raising (for threads)."""
        try:
            return OK, self.acquire(timeout, token, tokens)
        except exc.KeyMeshError as e:
            return e.code or -1, e

    def poll(self, tokens: int = 0) -> Optional[Key]:
        """One uncounted attempt: a Key, or None when no key is eligible now."""
        held = _Held()
        if tokens:
            rc = km_pool_poll_key_tokens(self.handle, int(tokens), ctypes.byref(held))
        else:
            rc = km_pool_poll_key(self.handle, ctypes.byref(held))
        if rc == OK:
            return self._key(held)
        if rc == NO_AVAILABLE_KEY:
            return None
        raise error(rc)

    def new_token(self) -> CancelToken:
        token = CancelToken(self)
        with self._tokens_lock:
            self._tokens.add(token)
        return token

    # ---- outcomes -----------------------------------------------------
    def release(self, key: Any, latency: Optional[float], tokens: int) -> None:
        raw, ticket = _key_args(key)
        lat = LATENCY_NONE if latency is None else _seconds(latency, "latency")
        rc = km_pool_release_key(self.handle, raw, ticket, lat, int(tokens))
        if rc != OK:
            raise error(rc, raw)

    def mark_failed(self, key: Any, permanent: bool = False) -> None:
        raw, ticket = _key_args(key)
        if permanent:
            rc = km_pool_mark_failed_key_permanent(self.handle, raw, ticket)
        else:
            rc = km_pool_mark_failed_key(self.handle, raw, ticket)
        if rc != OK:
            raise error(rc, raw, getattr(key, "name", None))

    def mark_rate_limited(self, key: Any, cooldown: Optional[float]) -> None:
        raw, ticket = _key_args(key)
        c = DEFAULT if cooldown is None else _seconds(cooldown, "cooldown")
        rc = km_pool_mark_rate_limited_key(self.handle, raw, ticket, c)
        if rc != OK:
            raise error(rc, raw)

    def observe_limits(self, key: Any, headers: Any) -> None:
        raw, _ = _key_args(key)
        items = list(headers.items()) if hasattr(headers, "items") else list(headers)
        n = len(items)
        names = (ctypes.c_char_p * max(n, 1))()
        values = (ctypes.c_char_p * max(n, 1))()
        for i, (name, value) in enumerate(items):
            names[i] = _encode(str(name), "header name")
            values[i] = _encode(str(value), "header value")
        rc = km_pool_observe_limits(self.handle, raw, names, values, n)
        if rc != OK:
            raise error(rc, raw)

    def cancel(self, key: Any) -> None:
        raw, ticket = _key_args(key)
        rc = km_pool_cancel_key(self.handle, raw, ticket)
        if rc != OK:
            raise error(rc, raw)

    def held_count(self, key: Any = None) -> int:
        n = ctypes.c_uint32()
        rc = km_pool_held_count(self.handle, None if key is None else _key_args(key)[0], ctypes.byref(n))
        if rc != OK:
            raise error(rc)
        return n.value

    # ---- administration -------------------------------------------------
    def add_key(self, key: Any, name: Optional[str], **limits: int) -> None:
        spec, _ = _spec({"secret": key, "name": name, **limits})
        rc = km_pool_add_key(self.handle, ctypes.byref(spec))
        if rc != OK:
            raise error(rc)

    def admin(self, fn: Any, name: str) -> None:
        rc = fn(self.handle, _encode(name, "name"))
        if rc != OK:
            raise error(rc, key_name=name)

    def key_name(self, key: Any) -> str:
        out = ctypes.c_void_p()
        rc = km_pool_key_name(self.handle, _key_args(key)[0], ctypes.byref(out))
        if rc != OK:
            raise error(rc)
        try:
            return ctypes.string_at(out.value).decode("utf-8", "replace")
        finally:
            km_string_free(out)

    def status_raw(self) -> Dict[str, Any]:
        out = ctypes.c_void_p()
        rc = km_pool_status_json(self.handle, ctypes.byref(out))
        if rc != OK:
            raise error(rc)
        try:
            return json.loads(ctypes.string_at(out.value).decode("utf-8"))
        finally:
            km_string_free(out)

    def available_count(self) -> int:
        n = ctypes.c_uint32()
        rc = km_pool_available_count(self.handle, ctypes.byref(n))
        if rc != OK:
            raise error(rc)
        return n.value

    def reclaim_dead(self) -> int:
        n = ctypes.c_uint32()
        rc = km_pool_reclaim_dead(self.handle, ctypes.byref(n))
        if rc != OK:
            raise error(rc)
        return n.value

    def close(self) -> None:
        """Idempotent; wakes waiters (they raise PoolClosedError)."""
        if self.closed:
            return
        self.closed = True
        km_pool_close(self.handle)  # triggers every token, waits for calls in progress

    def __del__(self) -> None:
        h, self.handle = getattr(self, "handle", None), None
        if h:
            km_pool_destroy(h)


def _seconds(value: Any, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise exc.ConfigError(f"{what} must be a number of seconds") from None
    if not (v >= 0.0) or v == float("inf"):
        raise exc.ConfigError(f"{what} must be a finite number of seconds >= 0")
    return v


def _spec(k: Any) -> Tuple[_KeySpec, Tuple[bytes, ...]]:
    """A km_key_spec from a secret string, a (name, secret) pair or a dict."""
    name: Any = None
    limits: Dict[str, Any] = {}
    if isinstance(k, (str, bytes)):
        secret = k
    elif isinstance(k, dict):
        k = dict(k)
        secret = k.pop("secret", None)
        name = k.pop("name", None)
        limits = k
        unknown = set(limits) - {"weight", "max_concurrency", "rpm", "tpm"}
        if unknown:
            raise exc.ConfigError(f"unknown key field(s): {', '.join(sorted(unknown))}")
    elif isinstance(k, tuple) and len(k) == 2:
        name, secret = k
    else:
        raise exc.ConfigError(f"an API key must be a str, a (name, secret) pair or a dict, "
                              f"not {type(k).__name__}")
    if secret is None:
        raise exc.ConfigError("an API key needs a secret")
    raw = _encode(secret, "key")
    raw_name = _encode(name, "key name") if name else None
    spec = _KeySpec()
    km_key_spec_init(ctypes.byref(spec))
    spec.name = raw_name
    spec.secret = raw
    spec.weight = int(limits.get("weight") or 1)
    spec.max_concurrency = int(limits.get("max_concurrency") or 0)
    spec.rpm = int(limits.get("rpm") or 0)
    spec.tpm = int(limits.get("tpm") or 0)
    # Keep the bytes referenced alongside the struct (ctypes copies c_char_p
    # pointers only).
    spec._keep = (raw, raw_name)  # type: ignore[attr-defined]
    return spec, (raw,)


def broker_reclaim(pid: int, socket: Optional[str] = None) -> int:
    n = ctypes.c_uint32()
    rc = km_broker_reclaim(_encode(socket, "socket") if socket else None, int(pid), ctypes.byref(n))
    if rc != OK:
        raise error(rc)
    return n.value
