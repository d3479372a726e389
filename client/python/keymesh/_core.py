"""The objects over the C ABI: Core (one km_pool handle), Key, CancelToken.

Internal: the public API is SyncKeyPool / KeyPool (_base.py), which share a
Core. The ctypes layer itself is _lib.py.
"""
from __future__ import annotations

import ctypes
import json
import operator
import threading
import weakref
from typing import Any, Dict, Iterable, Optional, Tuple

from . import _lib
from . import exceptions as exc
from ._lib import check, encode
from ._native import Key, Pool  # loaded by _lib, after the library it links to


# Key, the key string acquire() returns, is a str subclass built by the
# extension (its name, the lease it is: _km_raw, _km_ticket; masked repr).


def _key_args(key: Any) -> Tuple[bytes, int]:
    """(secret, ticket) of a Key, or (secret, 0: the oldest held) of a plain str."""
    if isinstance(key, Key):
        return key._km_raw, key._km_ticket
    return encode(key, "key"), 0


class CancelToken:
    """Ends one acquire wait of its Core from another thread (km_cancel)."""

    __slots__ = ("_core", "_handle", "__weakref__")

    def __init__(self, core: "Core") -> None:
        handle = ctypes.c_void_p()
        check(_lib.km_cancel_create(core.handle, ctypes.byref(handle)))
        self._core = core  # keeps the km_pool alive while the token lives
        self._handle: Optional[ctypes.c_void_p] = handle

    def trigger(self) -> None:
        _lib.km_cancel_trigger(self._handle)

    def __del__(self) -> None:
        h, self._handle = self._handle, None
        if h:
            _lib.km_cancel_destroy(h)


# Live pools, for the gunicorn/uwsgi hooks.
live_cores: "weakref.WeakSet[Core]" = weakref.WeakSet()

_KEY_FIELDS = ("weight", "max_concurrency", "rpm", "tpm", "burst", "rate_margin")
# The integer key fields and their largest values (the km_key_spec widths;
# burst as ValidateKeySpec bounds it).
_KEY_LIMITS = {"weight": (1 << 32) - 1, "max_concurrency": (1 << 32) - 1, "rpm": (1 << 32) - 1,
               "tpm": (1 << 64) - 1, "burst": 1_000_000}


class Core:
    """One km_pool handle and the operations both pool classes share.

    The handle is owned by ``native`` (a keymesh._native.Pool, which
    destroys it when freed) and used by both bindings: the hot path through
    ``native``, the cold calls through ctypes with ``handle``."""

    def __init__(self, handle: ctypes.c_void_p, *, attached: bool, socket: Optional[str] = None) -> None:
        self.handle = handle
        self.native = Pool(handle.value)
        self.attached = attached
        self.socket = socket
        self.closed = False
        self._tokens: "weakref.WeakSet[CancelToken]" = weakref.WeakSet()
        self._tokens_lock = threading.Lock()
        live_cores.add(self)

    # ---- construction -------------------------------------------------
    @classmethod
    def create(cls, keys: Iterable[Any], *, strategy: str, default_cooldown: float, max_failures: int,
               acquire_timeout: float, rate_margin: Optional[float] = None,
               max_leases_per_process: Optional[int] = None, burst: Optional[int] = None,
               owner: str) -> "Core":
        if isinstance(keys, (str, bytes)):
            raise exc.ConfigError(f"{owner} expects a sequence of API keys, not a single string")
        specs = [_spec(k) for k in keys]
        if not specs:
            raise exc.ConfigError(f"{owner} requires at least one API key.")
        opts = _lib.init(_lib.PoolOptions)
        opts.strategy = _lib.STRATEGY_CODES[strategy]
        # Every number is range-checked here: ctypes would store 2**32 in a
        # uint32 field as 0 and -1 as 4294967295 without a word.
        opts.default_cooldown = _seconds(default_cooldown, "default_cooldown")
        opts.max_failures = _uint(max_failures, "max_failures", U32, lo=1)
        opts.acquire_timeout = _seconds(acquire_timeout, "acquire_timeout")
        if rate_margin is not None:
            opts.rate_margin = _real(rate_margin, "rate_margin")
        if max_leases_per_process is not None:
            opts.max_leases_per_process = _uint(max_leases_per_process, "max_leases_per_process", U32, lo=1)
        if burst is not None:  # py-surface: the pool-wide burst (km_pool_options version 3)
            opts.burst = _uint(burst, "burst", MAX_BURST)
        arr = (_lib.KeySpec * len(specs))(*specs)
        handle = ctypes.c_void_p()
        check(_lib.km_pool_create(arr, len(specs), ctypes.byref(opts), ctypes.byref(handle)))
        return cls(handle, attached=False)

    @classmethod
    def connect(cls, pool: str, socket: Optional[str]) -> "Core":
        handle = ctypes.c_void_p()
        check(_lib.km_pool_connect(encode(socket, "socket") if socket else None, encode(pool, "pool"),
                                   ctypes.byref(handle)))
        return cls(handle, attached=True, socket=socket)

    # ---- acquire (the extension: range checks, the GIL released while waiting) ----
    def acquire(self, timeout: Optional[float], token: Optional[CancelToken] = None, tokens: int = 0) -> Key:
        return self.native.acquire(timeout, tokens, None if token is None or not token._handle else token._handle.value)

    def acquire_rc(self, timeout: Optional[float], token: Optional[CancelToken], tokens: int = 0) -> Tuple[int, Any]:
        """As acquire, but returns (rc, Key or error) instead of raising (for threads)."""
        try:
            return _lib.OK, self.acquire(timeout, token, tokens)
        except exc.KeyMeshError as e:
            return e.code or -1, e

    def poll(self, tokens: int = 0) -> Optional[Key]:
        """One uncounted attempt: a Key, or None when no key is eligible now."""
        return self.native.poll(tokens)

    def new_token(self) -> CancelToken:
        token = CancelToken(self)
        with self._tokens_lock:
            self._tokens.add(token)
        return token

    # ---- outcomes (the extension) ----------------------------------------
    def release(self, key: Any, latency: Optional[float], tokens: int) -> None:
        self.native.release(key, latency, tokens)

    def mark_failed(self, key: Any, permanent: bool = False) -> None:
        self.native.mark_failed(key, permanent)

    def mark_rate_limited(self, key: Any, cooldown: Optional[float]) -> None:
        self.native.mark_rate_limited(key, cooldown)

    def cancel(self, key: Any) -> None:
        self.native.cancel(key)

    def observe_limits(self, key: Any, headers: Any) -> None:
        raw, _ = _key_args(key)
        items = list(headers.items()) if hasattr(headers, "items") else list(headers)
        n = len(items)
        names = (ctypes.c_char_p * max(n, 1))()
        values = (ctypes.c_char_p * max(n, 1))()
        for i, (name, value) in enumerate(items):
            names[i] = encode(str(name), "header name")
            values[i] = encode(str(value), "header value")
        check(_lib.km_pool_observe_limits(self.handle, raw, names, values, n), raw)

    def held_count(self, key: Any = None) -> int:
        n = ctypes.c_uint32()
        check(_lib.km_pool_held_count(self.handle, None if key is None else _key_args(key)[0], ctypes.byref(n)))
        return n.value

    # ---- administration -------------------------------------------------
    def add_key(self, key: Any, name: Optional[str], **limits: Any) -> None:
        spec = _spec({"secret": key, "name": name, **limits})
        check(_lib.km_pool_add_key(self.handle, ctypes.byref(spec)))

    def admin(self, op: str, name: str) -> None:
        """One of _lib.KEY_OPS (remove_key, enable_key, ...) on key `name`."""
        check(_lib.KEY_OPS[op](self.handle, encode(name, "name")), key_name=name)

    def key_name(self, key: Any) -> str:
        return self._string(_lib.km_pool_key_name, _key_args(key)[0])

    def status_raw(self) -> Dict[str, Any]:
        """The C ABI's status JSON (the control protocol's shape)."""
        out: Dict[str, Any] = json.loads(self._string(_lib.km_pool_status_json))
        return out

    def available_count(self) -> int:
        return self._count(_lib.km_pool_available_count)

    def reclaim_dead(self) -> int:
        return self._count(_lib.km_pool_reclaim_dead)

    def close(self) -> None:
        """Idempotent; wakes waiters (they raise PoolClosedError)."""
        if self.closed:
            return
        self.closed = True
        _lib.km_pool_close(self.handle)  # triggers every token, waits for calls in progress

    def _string(self, fn: Any, *args: Any) -> str:
        out = ctypes.c_void_p()
        check(fn(self.handle, *args, ctypes.byref(out)))
        try:
            assert out.value is not None  # set by every call that returned OK
            return ctypes.string_at(out.value).decode("utf-8", "replace")
        finally:
            _lib.km_string_free(out)

    def _count(self, fn: Any) -> int:
        n = ctypes.c_uint32()
        check(fn(self.handle, ctypes.byref(n)))
        return n.value



# The C ABI's integer widths, and the longest duration it takes (as
# ValidatePoolOptions and the end calls do: about 31.7 years).
U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
MAX_SECONDS = 1e9
MAX_BURST = 1_000_000
MAX_PID = (1 << 31) - 1


def _real(value: Any, what: str) -> float:
    """A finite float; ConfigError (a ValueError) for anything else."""
    if isinstance(value, bool):
        raise exc.ConfigError(f"{what} must be a number, not a bool")
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise exc.ConfigError(f"{what} must be a number") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise exc.ConfigError(f"{what} must be a finite number")
    return v


def _seconds(value: Any, what: str) -> float:
    """A duration the C ABI takes: finite, >= 0, at most MAX_SECONDS."""
    try:
        v = _real(value, what)
    except exc.ConfigError:
        raise exc.ConfigError(f"{what} must be a finite number of seconds >= 0") from None
    if not 0.0 <= v <= MAX_SECONDS:
        raise exc.ConfigError(f"{what} must be a finite number of seconds >= 0 and <= {MAX_SECONDS:.0f}, not {v!r}")
    return v


def _uint(value: Any, what: str, hi: int, lo: int = 0) -> int:
    """An integer in [lo, hi] (an integral float is taken, a bool or 2.5 is
    not): checked before ctypes, which would wrap it silently."""
    if isinstance(value, bool):
        raise exc.ConfigError(f"{what} must be an integer, not a bool")
    try:
        n = operator.index(value)
    except TypeError:
        if isinstance(value, float) and value.is_integer():
            n = int(value)
        else:
            raise exc.ConfigError(f"{what} must be an integer, not {type(value).__name__} {value!r}") from None
    if not lo <= n <= hi:
        raise exc.ConfigError(f"{what} must be between {lo} and {hi}, not {n}")
    return n


def _tokens(value: Any) -> int:
    return 0 if value is None else _uint(value, "tokens", U64)


def _spec(k: Any) -> _lib.KeySpec:
    """A km_key_spec from a secret string, a (name, secret) pair or a dict
    (secret, and optional name, weight, max_concurrency, rpm, tpm, burst,
    rate_margin)."""
    name: Any = None
    limits: Dict[str, Any] = {}
    if isinstance(k, (str, bytes)):
        secret = k
    elif isinstance(k, dict):
        k = dict(k)
        secret = k.pop("secret", None)
        name = k.pop("name", None)
        limits = k
        unknown = set(limits) - set(_KEY_FIELDS)
        if unknown:
            raise exc.ConfigError(f"unknown key field(s): {', '.join(sorted(unknown))}")
    elif isinstance(k, tuple) and len(k) == 2:
        name, secret = k
    else:
        raise exc.ConfigError(f"an API key must be a str, a (name, secret) pair or a dict, "
                              f"not {type(k).__name__}")
    if secret is None:
        raise exc.ConfigError("an API key needs a secret")
    raw = encode(secret, "key")
    raw_name = encode(name, "key name") if name else None
    spec: _lib.KeySpec = _lib.init(_lib.KeySpec)
    spec.name = raw_name
    spec.secret = raw
    for field, hi in _KEY_LIMITS.items():
        if limits.get(field) is not None:
            setattr(spec, field, _uint(limits[field], field, hi))
    if limits.get("rate_margin") is not None:
        spec.rate_margin = _real(limits["rate_margin"], "rate_margin")
    # Keep the bytes referenced alongside the struct (ctypes stores only the
    # c_char_p pointers).
    spec._keep = (raw, raw_name)
    return spec


def parse_retry_after(value: str) -> float:
    """Seconds from now that a Retry-After value (delay-seconds or an
    HTTP-date) asks for. ConfigError (a ValueError) when malformed."""
    out = ctypes.c_double()
    check(_lib.km_parse_retry_after(encode(value, "Retry-After"), ctypes.byref(out)))
    return out.value


def parse_duration(value: str) -> float:
    """Seconds of a Go-style duration as in x-ratelimit-reset-* ("1s", "6m0s",
    "250ms"). ConfigError (a ValueError) when malformed."""
    out = ctypes.c_double()
    check(_lib.km_parse_duration(encode(value, "duration"), ctypes.byref(out)))
    return out.value


def broker_reclaim(pid: int, socket: Optional[str] = None) -> int:
    """Asks the broker at `socket` to free the leases of exited process `pid`."""
    n = ctypes.c_uint32()
    check(_lib.km_broker_reclaim(encode(socket, "socket") if socket else None, _uint(pid, "pid", MAX_PID, lo=1),
                                 ctypes.byref(n)))
    return n.value


__all__ = ["Core", "Key", "CancelToken", "live_cores", "parse_retry_after", "parse_duration", "broker_reclaim"]
