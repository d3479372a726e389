"""The acquire path of a pool with a custom scheduler (a BaseScheduler whose
``select`` is the user's Python).

Chosen once, when the pool is built (install()): a pool without one keeps
its class's native acquire untouched. The user's code never runs under the
segment's lock: snapshot (km_pool_snapshot), select, then acquire exactly
the chosen key if it is still eligible (km_pool_acquire_this_key). When the
key is no longer eligible (or the snapshot went stale) it takes a fresh
snapshot, at most MAX_RETRIES times per acquire, and then falls back to the
pool's own strategy, logging that once per pool. When select returns None,
or no key is eligible, it sleeps on the pool's futex (km_pool_wait_change)
until something changed, then asks again, until the acquire's timeout.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Any, Callable, Iterator, List, Optional, Sequence

from .. import _core, _lib
from ..exceptions import KeyMeshError, NoAvailableKeyError
from . import _abi
from .base import BaseScheduler
from .view import KeyView

log = logging.getLogger("keymesh")

# Fresh snapshots after the chosen key turned out no longer eligible, per
# acquire, before the pool's own strategy decides.
MAX_RETRIES = 3


class Chooser:
    """One pool's custom scheduler and the state its acquire path keeps."""

    def __init__(self, core: "_core.Core", scheduler: BaseScheduler, owner: str,
                 acquire_timeout: Optional[float], fallback: Callable[..., Any]) -> None:
        self.core = core
        self.fallback = fallback  # the pool class's own acquire(timeout, tokens), bound
        self.scheduler = scheduler
        self.owner = owner
        # A snapshot buffer per thread: no lock, so nothing a fork() could
        # leave held in the child.
        self._local = threading.local()
        self._acquire_timeout = acquire_timeout
        self._fallback_logged = False

    # ---- the steps (each never blocks) ---------------------------------
    def timeout_of(self, timeout: Optional[float]) -> float:
        if timeout is None:
            if self._acquire_timeout is None:
                raw = self.core.status_raw().get("options", {}).get("acquire_timeout", 30.0)
                self._acquire_timeout = float(raw) if isinstance(raw, (int, float)) else 30.0
            return self._acquire_timeout
        return _core._seconds(timeout, "timeout")

    def snapshot(self) -> _abi.Snapshot:
        snapshots: Optional[_abi.Snapshotter] = getattr(self._local, "snapshots", None)
        if snapshots is None:
            snapshots = self._local.snapshots = _abi.Snapshotter(self.core)
        return snapshots.take()

    def choose(self, snap: _abi.Snapshot) -> Optional[KeyView]:
        """The user's choice among the eligible keys, checked (None: no key now)."""
        candidates: List[KeyView] = [v for v in snap.views if v.is_available]
        if not candidates:
            return None
        choice = self.scheduler.select(candidates)
        if choice is None:
            return None
        if not any(choice is c for c in candidates):
            raise KeyMeshError(f"{type(self.scheduler).__name__}.select returned {_describe(choice)}, which is not "
                               f"one of its candidates (return one of the KeyView objects it was given, or None)")
        return choice

    def attempt(self, choice: KeyView, tokens: int) -> Optional["_core.Key"]:
        """The chosen key, or None when it is no longer eligible (or gone)."""
        rc, key = _abi.acquire_this(self.core, choice, tokens)
        if rc == _lib.OK:
            return key
        if rc in (_lib.NO_AVAILABLE_KEY, _lib.UNKNOWN_KEY):
            return None
        raise _lib.error(rc, key_name=choice.name)

    def note_fallback(self) -> None:
        if not self._fallback_logged:
            self._fallback_logged = True
            log.warning("%s: the keys %s.select chose kept being taken before this process could acquire them "
                        "(%d fresh snapshots in one acquire); such acquires fall back to the pool's strategy "
                        "(logged once per pool)", self.owner, type(self.scheduler).__name__, MAX_RETRIES + 1)

    # ---- SyncKeyPool ---------------------------------------------------
    def acquire(self, timeout: Optional[float] = None, tokens: int = 0) -> str:
        budget = self.timeout_of(timeout)
        deadline = time.monotonic() + budget
        retries = 0
        token: Optional[_core.CancelToken] = None
        while True:
            snap = self.snapshot()
            choice = self.choose(snap)
            if choice is not None:
                key = self.attempt(choice, tokens)
                if key is not None:
                    return key
                retries += 1
                if retries <= MAX_RETRIES:
                    continue
                self.note_fallback()
                fallen: str = self.fallback(max(0.0, deadline - time.monotonic()), tokens)
                return fallen
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoAvailableKeyError(_no_key_message(budget, snap))
            if token is None:
                token = self.core.new_token()
            _abi.wait_change(self.core, snap.wake_seq, remaining, token)

    # ---- KeyPool (asyncio) ---------------------------------------------
    async def acquire_async(self, timeout: Optional[float] = None, tokens: int = 0) -> str:
        """select runs in the loop (it is the user's code, quick by contract);
        only the waits run in a helper thread."""
        budget = self.timeout_of(timeout)
        deadline = time.monotonic() + budget
        retries = 0
        while True:
            snap = self.snapshot()
            choice = self.choose(snap)
            if choice is not None:
                key = self.attempt(choice, tokens)
                if key is not None:
                    return key
                retries += 1
                if retries <= MAX_RETRIES:
                    continue
                self.note_fallback()
                key_str: str = await self.fallback(max(0.0, deadline - time.monotonic()), tokens)
                return key_str
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoAvailableKeyError(_no_key_message(budget, snap))
            await _wait_in_thread(self.core, snap.wake_seq, remaining)


async def _wait_in_thread(core: "_core.Core", wake_seq: int, timeout: float) -> None:
    """wait_change in a helper thread; a cancelled task ends it (its token)."""
    loop = asyncio.get_running_loop()
    done: "asyncio.Future[None]" = loop.create_future()
    token = core.new_token()

    def settle(error: Optional[BaseException]) -> None:  # loop thread
        if done.done():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def run() -> None:  # helper thread
        error: Optional[BaseException] = None
        try:
            _abi.wait_change(core, wake_seq, timeout, token)
        except BaseException as e:  # handed to the coroutine
            error = e
        try:
            loop.call_soon_threadsafe(settle, error)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=run, name="keymesh-wait", daemon=True).start()
    try:
        await done
    except asyncio.CancelledError:
        token.trigger()
        raise


def _describe(value: Any) -> str:
    if isinstance(value, KeyView):
        return f"a KeyView of key {value.name!r} that is not among the candidates of this call"
    if isinstance(value, str):
        return "a str (return the candidate's KeyView, not its key)"
    return f"a {type(value).__name__}"


def _no_key_message(budget: float, snap: _abi.Snapshot) -> str:
    base = NoAvailableKeyError().message
    eligible = sum(1 for v in snap.views if v.is_available)
    if eligible:
        return f"{base} The pool's scheduler chose none of the {eligible} eligible keys within {budget:g} s."
    return base


def install(pool: Any, core: "_core.Core", scheduler: BaseScheduler, acquire_timeout: Optional[float]) -> Chooser:
    """Makes ``pool.acquire`` (and a SyncKeyPool's ``lease``) the custom path:
    instance attributes, so the class's native methods, used by every pool
    without a custom scheduler, are untouched."""
    native = type(pool).acquire.__get__(pool, type(pool))
    asynchronous = asyncio.iscoroutinefunction(native)
    chooser = Chooser(core, scheduler, type(pool).__name__, acquire_timeout, native)
    method: Callable[..., Any] = chooser.acquire_async if asynchronous else chooser.acquire
    pool.acquire = method
    if not asynchronous:  # KeyPool.lease already awaits self.acquire
        from .._base import reporting

        @contextlib.contextmanager
        def lease(timeout: Optional[float] = None) -> Iterator[str]:
            """SyncKeyPool.lease through the custom scheduler."""
            key = chooser.acquire(timeout)
            with reporting(core, key):
                yield key

        pool.lease = lease
    return chooser


__all__: Sequence[str] = ["Chooser", "install", "MAX_RETRIES"]
