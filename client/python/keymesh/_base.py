"""What SyncKeyPool and KeyPool share: construction (embedded and
attached), the calls that never wait (plain methods in both, as the
original's status and available_count were plain in the async pool too),
the outcome a ``lease()`` block reports, and the key administration table.

The two classes differ only where the asyncio pool must not block its event
loop (acquire) and where it keeps the original's coroutine signatures.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

from . import _core
from ._core import Core
from ._status import shape_status
from .exceptions import KeyExhaustedError, KeyMeshError, KeyNotHeldError
from .scheduler import SchedulerStrategy, parse_strategy, resolve_scheduler

log = logging.getLogger("keymesh")


class PoolBase:
    """The pool surface both classes share; ``_owner`` names the class in messages."""

    _owner = "KeyPool"
    _core: Core

    def __init__(self, keys: Sequence[Any], *, strategy: Union[str, SchedulerStrategy] = SchedulerStrategy.LEAST_BUSY,
                 scheduler: Any = None, storage: Any = None, default_cooldown: float = 60.0,
                 max_failures: int = 10, acquire_timeout: float = 30.0, rate_margin: Optional[float] = None,
                 max_leases_per_process: Optional[int] = None, burst: Optional[int] = None) -> None:
        """An embedded pool (no broker: state lives in an anonymous shared mapping
        inherited by children forked afterwards). ``keys`` items are secrets (str),
        ``(name, secret)`` pairs, or dicts with ``secret`` and optional ``name``,
        ``weight``, ``max_concurrency``, ``rpm``, ``tpm``, ``burst`` and
        ``rate_margin``. ``rate_margin`` (default 0.02): keys are paced at
        (1 - rate_margin) x their rpm/tpm. ``burst`` (default none, 0..1000000):
        the burst of every key given none, here or by add_key (a key's own
        wins). ``max_leases_per_process`` (default:
        half the lease table): leases one process may hold at once; a blocking
        acquire over it waits for one of its leases to end. Every number is
        range-checked (ConfigError, a ValueError, when out of range).
        ``storage`` (keymesh.storage, or a BaseStorage/BaseSyncStorage subclass;
        default None: nothing saved): each key's snapshot is saved after its
        release, mark_failed and mark_rate_limited by a background writer, and
        the keys' counters, latency average and remaining cooldown are restored
        from it here (a blocking read of the storage: build the pool before
        the event loop runs, as servers do at start-up)."""
        keys = list(keys) if not isinstance(keys, (str, bytes)) else keys
        # py-sched: a built-in scheduler is its native strategy; a custom one
        # (its own select) gets the Python acquire path (keymesh.scheduler._choose).
        s, custom = resolve_scheduler(scheduler) if scheduler is not None else (parse_strategy(strategy), None)
        core = _core.Core.create(keys, strategy=s.value, default_cooldown=default_cooldown,
                                 max_failures=max_failures, acquire_timeout=acquire_timeout,
                                 rate_margin=rate_margin, max_leases_per_process=max_leases_per_process,
                                 burst=burst, owner=self._owner)
        log.info("%s initialised: %d keys, strategy=%s", self._owner, len(keys), s.value)
        self._init_core(core)
        if storage is not None:  # py-storage (before the hot path is bound: the writer wraps the outcomes)
            self._attach_storage(storage, keys)
        self._bind_hot_path()
        if custom is not None:  # py-sched
            self._use_scheduler(custom, acquire_timeout)

    @classmethod
    def connect(cls, pool: str, socket: Optional[str] = None, scheduler: Any = None, storage: Any = None) -> Any:
        """Attach to pool ``pool`` of the keymesh-broker at ``socket`` (default:
        $KEYMESH_SOCKET, else /run/keymesh/keymesh.sock), shared by every process
        on the host. Connecting is a short blocking exchange with the local
        broker (done once per process). Raises BrokerUnavailableError.
        ``scheduler``: a custom BaseScheduler chooses this process's keys; a
        built-in one whose strategy is not the broker pool's runs its ``select``
        in this process (the pool's strategy is the broker's configuration).
        ``storage``: as for the constructor, saved to but not restored from
        (the broker's state file is the authority for attached pools)."""
        self = cls.__new__(cls)
        self._init_core(_core.Core.connect(pool, socket))
        if storage is not None:  # py-storage
            self._attach_storage(storage, None)
        self._bind_hot_path()
        if scheduler is not None:  # py-sched
            custom, timeout = self._attached_scheduler(scheduler)
            if custom is not None:
                self._use_scheduler(custom, timeout)
        return self

    # ---- py-sched: custom schedulers -----------------------------------
    def _use_scheduler(self, scheduler: Any, acquire_timeout: Optional[float]) -> None:
        """Installs the Python acquire path of a custom scheduler (chosen once:
        pools without one keep the native acquire)."""
        from .scheduler import _choose
        self._chooser = _choose.install(self, self._core, scheduler, acquire_timeout)

    def _attached_scheduler(self, scheduler: Any) -> Tuple[Any, Optional[float]]:
        from .scheduler import build_scheduler
        s, custom = resolve_scheduler(scheduler)
        if custom is None:
            raw = self._core.status_raw()
            if raw.get("strategy") == s.value:
                return None, None
            log.info("%s: pool's strategy is %s (the broker's); this process's %s runs in Python",
                     self._owner, raw.get("strategy"), type(scheduler).__name__)
            custom = scheduler if hasattr(type(scheduler), "select") else build_scheduler(s)
        return custom, None

    # ---- py-storage: storage= (keymesh/storage/_writer.py) ----------------
    def _attach_storage(self, storage: Any, keys: Any) -> None:
        """Puts ``storage`` behind the pool's outcome calls (a background
        writer saves each changed key's snapshot) and, for an embedded pool
        (``keys`` not None), restores the keys' state from it first. Only
        pools given a storage pay for it."""
        from .storage._writer import attach
        self._core = attach(self._core, storage, keys)

    def _init_core(self, core: Core) -> None:
        """The one place a pool object gets its state (both constructors)."""
        self._core = core

    def _bind_hot_path(self) -> None:
        """Once the core is final (storage included) and before a custom
        scheduler takes over acquire: SyncKeyPool binds its hot calls straight
        to the extension; the asyncio pool keeps its coroutines."""

    # ---- calls that never wait -------------------------------------------
    def observe_limits(self, key: str, headers: Any) -> None:
        """Feeds a response's rate-limit headers for ``key`` (a mapping or
        (name, value) pairs: Retry-After, retry-after-ms,
        x-ratelimit-{remaining,reset,limit}-{requests,tokens}) to the pool, so
        every process paces the key by what the provider says is left.
        ConfigError names a malformed header. The lease stays held."""
        self._core.observe_limits(key, headers)

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


@contextlib.contextmanager
def reporting(core: "_core.Core", key: str) -> Iterator[None]:
    """The outcome of a ``lease()`` block for ``key``: a release with the measured
    latency, or on an exception a failure (KeyExhaustedError is logged, the
    original exception propagates), or on a BaseException (a cancelled task,
    KeyboardInterrupt) a cancel. If the block already reported an outcome for
    the key (e.g. mark_rate_limited), nothing more is reported."""
    start = time.monotonic()
    try:
        yield
    except Exception:
        end_quietly(core.mark_failed, key, swallow_all=True)
        raise
    except BaseException:
        end_quietly(core.cancel, key, swallow_all=True)
        raise
    else:
        end_quietly(core.release, key, time.monotonic() - start, 0)


def end_quietly(fn: Any, *args: Any, swallow_all: bool = False) -> None:
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


_KEY_OP_DOCS = {
    "remove_key": "Removes key ``name``; it leaves rotation at once and goes once its leases ended.",
    "enable_key": "Puts key ``name`` back into rotation.",
    "disable_key": "Takes key ``name`` out of rotation (its leases stay valid).",
    "reset_key": "Clears key ``name``'s cooldown, failure and 429 streaks and open circuit.",
}


def key_ops(asynchronous: bool) -> Tuple[Callable[..., Any], ...]:
    """remove_key, enable_key, disable_key, reset_key: plain methods, or
    coroutines (the original's signatures in the asyncio pool)."""
    def make(op: str) -> Callable[..., Any]:
        if asynchronous:
            async def method(self: PoolBase, name: str) -> None:
                self._core.admin(op, name)
        else:
            def method(self: PoolBase, name: str) -> None:  # type: ignore[misc]
                self._core.admin(op, name)
        method.__name__ = method.__qualname__ = op
        method.__doc__ = _KEY_OP_DOCS[op]
        return method
    return tuple(make(op) for op in _KEY_OP_DOCS)
