"""SyncKeyPool: the original's threaded, blocking pool, over the shared segment.

One pool object may be used from any number of threads; a pool created
before fork() works in every child (see keymesh/__init__.py).
"""
from __future__ import annotations

import contextlib
import logging
import time
import warnings
from typing import Any, Dict, Iterator, Optional, Sequence, Union

from . import _native
from .exceptions import KeyExhaustedError, KeyMeshError, KeyNotHeldError
from .scheduler import SchedulerStrategy, parse_strategy, strategy_of_scheduler

log = logging.getLogger("keymesh")


def _build_core(owner: str, keys: Sequence[Any], strategy: Union[str, SchedulerStrategy], scheduler: Any,
                storage: Any, default_cooldown: float, max_failures: int,
                acquire_timeout: float) -> "_native.Core":
    s = strategy_of_scheduler(scheduler) if scheduler is not None else parse_strategy(strategy)
    if storage is not None:
        warnings.warn("keymesh: storage= is ignored; an embedded pool lives in shared memory for the "
                      "life of its processes, and keymesh-broker persists attached pools",
                      UserWarning, stacklevel=3)
    core = _native.Core.create(keys, strategy=s.value, default_cooldown=default_cooldown,
                               max_failures=max_failures, acquire_timeout=acquire_timeout, owner=owner)
    log.info("%s initialised: %d keys, strategy=%s", owner, len(keys), s.value)
    return core


# Per key: the original's name <- the protocol's.
_KEY_ALIASES = {"acquire_count": "acquires", "rate_limited_count": "rate_limited",
                "reclaimed_count": "reclaimed", "cancelled_count": "cancelled"}


def shape_status(raw: Dict[str, Any]) -> Dict[str, Any]:
    """The C ABI's status JSON (the control protocol's shape) in the original's
    shape (plus KeyMesh's fields): the original's names are made here."""
    m = raw["pool_metrics"]
    metrics = dict(m)
    metrics["uptime"] = round(m["uptime"], 2)
    metrics["uptime_seconds"] = metrics["uptime"]          # the original's name
    metrics["total_cooldowns"] = m["total_rate_limited"]    # the original's name
    metrics["total_timeouts"] = m["timeouts"]
    keys = []
    for k in raw["keys"]:
        e = dict(k)
        for alias, name in _KEY_ALIASES.items():
            e[alias] = k[name]
        e["cooldown_remaining"] = round(k["cooldown_remaining"], 2)
        e["latency_avg"] = round(k["latency_avg"], 4)
        e["health_score"] = round(k["health_score"], 4)
        keys.append(e)
    try:
        scheduler: Any = SchedulerStrategy(raw["strategy"])
    except ValueError:
        scheduler = raw["strategy"]
    out = {"pool_metrics": metrics, "scheduler": scheduler, "keys": keys}
    out["name"] = raw.get("name")
    out["options"] = raw.get("options")
    return out


class _PoolReads:
    """What SyncKeyPool and KeyPool share: the calls that never wait, so
    they are plain methods in both (the original's status and
    available_count were plain in the async pool too)."""

    _core: "_native.Core"

    def key_name(self, key: str) -> str:
        """The name of the pool's key holding secret ``key``."""
        return self._core.key_name(key)

    def held_count(self, key: Optional[str] = None) -> int:
        """Leases this process holds (for ``key``, or in all)."""
        return self._core.held_count(key)

    def reclaim_dead(self) -> int:
        """Frees leases of processes that died holding them (embedded pools)."""
        return self._core.reclaim_dead()

    def status(self) -> Dict[str, Any]:
        return shape_status(self._core.status_raw())

    def available_count(self) -> int:
        return self._core.available_count()

    def __repr__(self) -> str:
        kind = "attached" if self._core.attached else "embedded"
        return f"<{type(self).__name__} {kind}{' closed' if self._core.closed else ''}>"


class SyncKeyPool(_PoolReads):
    """A pool of API keys shared by threads and processes.

    Embedded (the original's constructor; no broker: state lives in an
    anonymous shared mapping inherited by children forked afterwards)::

        pool = SyncKeyPool(["sk-a", "sk-b"], strategy="least_busy")

    Attached to a keymesh-broker (shared by every process on the host)::

        pool = SyncKeyPool.connect("openai", socket="/run/keymesh/keymesh.sock")

    ``keys`` items are secrets (str), ``(name, secret)`` pairs, or dicts with
    ``secret`` and optional ``name``, ``weight``, ``max_concurrency``,
    ``rpm``, ``tpm``.
    """

    _owner = "SyncKeyPool"

    def __init__(self, keys: Sequence[Any], *, strategy: Union[str, SchedulerStrategy] = SchedulerStrategy.LEAST_BUSY,
                 scheduler: Any = None, storage: Any = None, default_cooldown: float = 60.0,
                 max_failures: int = 10, acquire_timeout: float = 30.0) -> None:
        keys = list(keys) if not isinstance(keys, (str, bytes)) else keys
        self._core = _build_core(self._owner, keys, strategy, scheduler, storage, default_cooldown,
                                 max_failures, acquire_timeout)
        self._default_cooldown = float(default_cooldown)

    @classmethod
    def connect(cls, pool: str, socket: Optional[str] = None) -> "SyncKeyPool":
        """Attach to pool ``pool`` of the broker at ``socket`` (default: $KEYMESH_SOCKET,
        else /run/keymesh/keymesh.sock). Raises BrokerUnavailableError."""
        self = cls.__new__(cls)
        self._core = _native.Core.connect(pool, socket)
        self._default_cooldown = None
        return self

    # ---- keys ---------------------------------------------------------
    def acquire(self, timeout: Optional[float] = None, tokens: int = 0) -> str:
        """The secret of an eligible key; waits up to ``timeout`` seconds (default:
        the pool's acquire_timeout). Raises NoAvailableKeyError. The GIL is
        released while waiting. ``tokens``: the request's expected token count,
        reserved up front from the key's TPM budget (release(tokens=) corrects it)."""
        return self._core.acquire(timeout, None, tokens)

    def release(self, key: str, latency: Optional[float] = None, tokens: int = 0) -> None:
        """Success. ``latency`` None leaves the key's latency average unchanged.
        KeyNotHeldError if this process does not hold ``key``; UnknownKeyError if
        the key is not in the pool."""
        self._core.release(key, latency, tokens)

    def mark_failed(self, key: str, permanent: bool = False) -> None:
        """A non-429 failure; KeyExhaustedError when this failure made the key
        reach max_failures (once: the key's circuit opens for its cooldown, then
        one caller probes it). ``permanent=True`` (an authentication failure,
        e.g. HTTP 401) revokes the key until reset_key/add_key."""
        self._core.mark_failed(key, permanent)

    def observe_limits(self, key: str, headers: Any) -> None:
        """Feeds a response's rate-limit headers for ``key`` (a mapping or
        (name, value) pairs: Retry-After, retry-after-ms,
        x-ratelimit-{remaining,reset,limit}-{requests,tokens}) to the pool, so
        every process paces the key by what the provider says is left.
        ConfigError names a malformed header. The lease stays held."""
        self._core.observe_limits(key, headers)

    def mark_rate_limited(self, key: str, cooldown: Optional[float] = None) -> None:
        """A 429: cools the key for ``cooldown`` seconds (None: the pool's default)."""
        self._core.mark_rate_limited(key, cooldown)

    def cancel(self, key: str) -> None:
        """Ends the lease without an outcome (the request was never sent)."""
        self._core.cancel(key)

    @contextlib.contextmanager
    def lease(self, timeout: Optional[float] = None) -> Iterator[str]:
        """Acquire; on exit release with the measured latency, or on an exception
        mark the key failed (KeyExhaustedError is logged, the original exception
        propagates). If the block already reported an outcome for the key
        (e.g. mark_rate_limited), nothing more is reported."""
        key = self._core.acquire(timeout)
        start = time.monotonic()
        try:
            yield key
        except Exception:
            _end_quietly(self._core.mark_failed, key, swallow_all=True)
            raise
        except BaseException:
            _end_quietly(self._core.cancel, key, swallow_all=True)
            raise
        else:
            _end_quietly(self._core.release, key, time.monotonic() - start, 0)

    # ---- administration -------------------------------------------------
    def add_key(self, key: str, name: Optional[str] = None, **limits: int) -> None:
        """Adds a key, or re-admits an existing one (clears its failure streak and
        exhaustion, keeps its counters). ``limits``: weight, max_concurrency, rpm, tpm."""
        self._core.add_key(key, name, **limits)

    def remove_key(self, name: str) -> None:
        self._core.admin(_native.km_pool_remove_key, name)

    def enable_key(self, name: str) -> None:
        self._core.admin(_native.km_pool_enable_key, name)

    def disable_key(self, name: str) -> None:
        self._core.admin(_native.km_pool_disable_key, name)

    def reset_key(self, name: str) -> None:
        self._core.admin(_native.km_pool_reset_key, name)

    def close(self) -> None:
        """Idempotent. Waiting acquires raise PoolClosedError."""
        self._core.close()

    def __enter__(self) -> "SyncKeyPool":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _end_quietly(fn: Any, *args: Any, swallow_all: bool = False) -> None:
    """Reports a lease() outcome. Not held: the block already reported one."""
    try:
        fn(*args)
    except KeyNotHeldError:
        pass
    except KeyExhaustedError as e:
        log.warning("%s", e)
    except KeyMeshError as e:
        if not swallow_all:
            raise
        log.warning("keymesh: could not report the outcome of a lease: %s", e)
