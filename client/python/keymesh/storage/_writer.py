"""The background writer behind ``storage=``, and the pool hook that feeds it.

The fast path only marks a key dirty: release / mark_failed /
mark_rate_limited add the key to a set under a lock that nobody holds for
longer than a set swap (O(1), no I/O, no status read). One writer thread per
process and pool wakes up, waits ``delay`` seconds for more events to
coalesce, reads the pool's status once, and hands the changed keys'
snapshots to the storage in one ``save_many`` (or one ``save`` per key for
a storage without it). An async storage's coroutines run on the writer's own
event loop, never on the caller's.

Errors of the storage (a user's subclass may raise anything) are logged
with every secret masked, never raised into the worker's call.

Fork: the child gets a fresh writer state (new locks, no thread; its own
thread starts at its first event); what the parent marked is the parent's
to write. close() and interpreter exit flush what is pending.
"""
from __future__ import annotations

import asyncio
import atexit
import inspect
import logging
import threading
import time
import weakref
from typing import Any, Callable, Dict, List, Optional, Set

from .. import _lib
from ..exceptions import KeyExhaustedError, KeyMeshError
from . import _forksafe

log = logging.getLogger("keymesh")

# Seconds the writer waits after the first event of a batch for more.
DEFAULT_DELAY = 0.05
# Seconds close() and interpreter exit wait for pending saves.
FLUSH_TIMEOUT = 10.0


def mask_in(text: str, secrets: Any) -> str:
    """``text`` with every secret of ``secrets`` replaced by its mask."""
    for s in secrets:
        s = str(s)
        if s and s in text:
            text = text.replace(s, _lib.mask_secret(s))
    return text


def snapshot(k: Dict[str, Any], now_mono: float, now_wall: float) -> Dict[str, Any]:
    """The original's per-key snapshot (its fields in its order: §2.9 of
    original-semantics.md) of one key of the status JSON, then KeyMesh's
    additions (``name``, ``rate_limited_count``, ``fail_streak``,
    ``has_latency`` and ``saved_at``, the wall-clock time the remaining
    cooldown is counted from at restore)."""
    remaining = float(k["cooldown_remaining"])
    ago = k.get("last_used_ago")
    last_used = 0.0
    if isinstance(ago, (int, float)) and not isinstance(ago, bool) and ago >= 0:
        last_used = now_mono - float(ago)
    return {
        "key_suffix": k["key_suffix"],
        "active_requests": k["active_requests"],
        "cooldown_until": now_mono + remaining if remaining > 0 else 0.0,
        "cooldown_remaining": round(remaining, 2),
        "success_count": k["success_count"],
        "failure_count": k["failure_count"],
        "latency_avg": round(float(k["latency_avg"]), 4),
        "last_used": last_used,
        "is_available": bool(k["is_available"]),
        "health_score": round(float(k["health_score"]), 4),
        "name": k["name"],
        "rate_limited_count": k["rate_limited"],
        "fail_streak": k["fail_streak"],
        "has_latency": bool(k["has_latency"]),
        "saved_at": now_wall,
    }


class _Call:
    """A function run on the writer thread for another thread, which waits."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.value: Any = None
        self.error: Optional[BaseException] = None


class StorageWriter:
    """One pool's writer: dirty keys in, storage saves out (see module doc).
    ``core`` is the pool's Core (status_raw, key_name)."""

    def __init__(self, core: Any, storage: Any, delay: float = DEFAULT_DELAY) -> None:
        self._core = core
        self.storage = storage
        self._delay = delay
        self._closed = False
        self._reset()
        _forksafe.register(self)
        _live.add(self)

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._dirty: Set[str] = set()
        self._calls: List[_Call] = []
        self._thread: Optional[threading.Thread] = None
        self._idle = False      # the thread waits for work (mark notifies it)
        self._urgent = False    # flush/close: write now, no coalescing delay
        self._busy = False      # a batch is being written
        self._stopping = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._secrets: Set[str] = set()  # every key seen, to mask messages

    def _after_fork_in_child(self) -> None:
        self._reset()

    # ---- the hot side ------------------------------------------------------
    def mark(self, key: str) -> None:
        """``key``'s state changed: save its snapshot soon (any thread)."""
        with self._cond:
            self._dirty.add(key)
            if self._idle:
                self._idle = False
                self._cond.notify()
            elif self._thread is None:
                self._start()

    # ---- the cold side -------------------------------------------------------
    def call(self, fn: Callable[[], Any]) -> Any:
        """Runs ``fn()`` on the writer thread (awaiting its result on the
        writer's loop if it is awaitable) and returns its result or raises."""
        job = _Call(fn)
        with self._cond:
            self._calls.append(job)
            if self._thread is None:
                self._start()
            self._cond.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.value

    def flush(self, timeout: float = FLUSH_TIMEOUT) -> bool:
        """Waits (up to ``timeout`` s) until every key marked so far is saved;
        False on timeout."""
        with self._cond:
            if not self._dirty and not self._busy:
                return True
            if self._thread is None:
                self._start()
            self._urgent = True
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: not self._dirty and not self._busy, timeout)
            finally:
                self._urgent = False

    def close(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Flushes, closes the storage (on the writer's loop for an async one)
        and stops the thread. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
        _live.discard(self)
        if not self.flush(timeout):
            log.error("keymesh: storage: saves still pending after %.0f s at close", timeout)
        close = getattr(self.storage, "close", None)
        if callable(close):
            try:
                self.call(close)
            except Exception as e:
                log.error("keymesh: storage: %s.close() failed: %s", type(self.storage).__name__,
                          mask_in(str(e), self._secrets))
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # ---- the writer thread -----------------------------------------------------
    def _start(self) -> None:  # under self._cond
        self._thread = threading.Thread(target=self._run, name="keymesh-storage", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._dirty or self._calls or self._stopping):
                        self._idle = True
                        self._cond.wait()
                    self._idle = False
                    if self._dirty and not self._calls and not self._urgent and not self._stopping:
                        # Coalesce: more events come in bursts.
                        self._cond.wait_for(lambda: self._urgent or self._stopping or bool(self._calls),
                                            self._delay)
                    calls, self._calls = self._calls, []
                    batch, self._dirty = self._dirty, set()
                    if not calls and not batch and self._stopping:
                        return
                    self._busy = True
                try:
                    for job in calls:
                        self._run_call(job)
                    if batch:
                        self._write(batch)
                finally:
                    with self._cond:
                        self._busy = False
                        self._cond.notify_all()
        finally:
            if self._loop is not None:
                self._loop.close()
                self._loop = None

    def _await(self, value: Any) -> Any:
        if inspect.isawaitable(value):
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            return self._loop.run_until_complete(value)
        return value

    def _run_call(self, job: _Call) -> None:
        try:
            job.value = self._await(job.fn())
        except BaseException as e:  # handed to the caller's thread
            job.error = e
        finally:
            job.done.set()

    def _states(self, batch: Set[str]) -> Dict[str, Dict[str, Any]]:
        """raw key -> snapshot of the keys of ``batch`` still in the pool, read
        now ({} when the status cannot be read: logged)."""
        try:
            raw = self._core.status_raw()
        except KeyMeshError as e:
            log.error("keymesh: storage: cannot read the pool's state, %d key(s) not saved: %s", len(batch), e)
            return {}
        by_name = {k["name"]: k for k in raw["keys"]}
        now_mono, now_wall = time.monotonic(), time.time()
        states: Dict[str, Dict[str, Any]] = {}
        for key in batch:
            name = getattr(key, "name", None)
            if not isinstance(name, str):
                try:
                    name = self._core.key_name(key)
                except KeyMeshError:
                    continue  # removed meanwhile
            entry = by_name.get(name)
            if entry is not None:
                states[str(key)] = snapshot(entry, now_mono, now_wall)
        return states

    def _write(self, batch: Set[str]) -> None:
        self._secrets.update(str(k) for k in batch)
        storage = self.storage
        try:
            fresh = getattr(storage, "_km_save_fresh", None)
            if callable(fresh):  # ours: the snapshots are read under the storage's lock
                self._await(fresh(lambda: self._states(batch)))
                return
            states = self._states(batch)
            if not states:
                return
            save_many = getattr(storage, "save_many", None)
            if callable(save_many):
                self._await(save_many(states))
            else:
                for key, state in states.items():
                    self._await(storage.save(key, state))
        except Exception as e:  # a user's storage may raise anything
            log.error("keymesh: storage: %s failed to save %d key(s) (%s): %s: %s", type(storage).__name__,
                      len(batch), ", ".join(_lib.mask_secret(str(k)) for k in batch), type(e).__name__,
                      mask_in(str(e), batch))


_live: "weakref.WeakSet[StorageWriter]" = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    for w in list(_live):
        w.flush(FLUSH_TIMEOUT)


class StoredNative:
    """A pool's keymesh._native.Pool with storage: the outcome calls (same
    arguments as the extension's) also mark the key dirty; acquire, poll and
    the rest are the extension's own."""

    def __init__(self, native: Any, writer: StorageWriter) -> None:
        self._native = native
        self._writer = writer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._native, name)

    def release(self, key: Any, latency: Optional[float] = None, tokens: Any = 0) -> None:
        self._native.release(key, latency, tokens)
        self._writer.mark(key)

    def mark_failed(self, key: Any, permanent: bool = False) -> None:
        try:
            self._native.mark_failed(key, permanent)
        except KeyExhaustedError:  # recorded, then raised
            self._writer.mark(key)
            raise
        self._writer.mark(key)

    def mark_rate_limited(self, key: Any, cooldown: Optional[float] = None) -> None:
        self._native.mark_rate_limited(key, cooldown)
        self._writer.mark(key)


class StoredCore:
    """A pool's Core with storage: the three outcome calls (its own and its
    extension's) also mark the key dirty, close() flushes first. Everything else is the Core's. Only pools
    created with ``storage=`` have one; the others keep their Core (the fast
    path pays nothing)."""

    def __init__(self, core: Any, writer: StorageWriter) -> None:
        self._inner = core
        self._writer = writer
        # The pools call the extension for the outcomes (SyncKeyPool binds
        # them straight to it), the lease() blocks and the scheduler's path
        # the Core: with a storage, both go through the writer's marks.
        self.native = StoredNative(core.native, writer)
        self.release = self.native.release
        self.mark_failed = self.native.mark_failed
        self.mark_rate_limited = self.native.mark_rate_limited

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def close(self) -> None:
        if not self._inner.closed:
            self._writer.close()
        self._inner.close()

    async def aclose(self) -> None:
        """close() for KeyPool: the flush waits in a worker thread, not in the loop."""
        await asyncio.to_thread(self.close)


def _secrets_of(keys: Any) -> List[str]:
    """The raw secrets of a constructor's ``keys`` (already validated by Core.create)."""
    out = []
    for k in keys:
        s = k.get("secret") if isinstance(k, dict) else k[1] if isinstance(k, tuple) else k
        if isinstance(s, bytes):
            s = s.decode("utf-8", "surrogateescape")
        if isinstance(s, str):
            out.append(s)
    return out


def attach(core: Any, storage: Any, keys: Any = None) -> Any:
    """The pool hook: ``core`` with ``storage`` behind it. ``keys`` (an
    embedded pool's constructor argument) are restored from the storage
    first; None (attached pools) restores nothing: the broker's state file
    is their authority. Returns a StoredCore (typed Any: it stands for the
    Core it wraps)."""
    from ..exceptions import ConfigError
    from ._restore import load_entries, restore

    if not callable(getattr(storage, "save", None)):
        raise ConfigError(f"storage must be a BaseStorage or BaseSyncStorage (an object with save()), "
                          f"not {type(storage).__name__}")
    writer = StorageWriter(core, storage)
    if keys is not None:
        secrets = _secrets_of(keys)
        entries = load_entries(writer.call, storage, secrets)
        if entries is not None:
            n = restore(core.handle, entries, secrets, core.key_name)
            if n:
                log.info("keymesh: storage: restored %d key(s) from %s", n, type(storage).__name__)
    return StoredCore(core, writer)
