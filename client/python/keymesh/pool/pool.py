"""KeyPool: the original's asyncio pool, over the shared segment.

``await acquire()`` never blocks the event loop: it first makes one
uncounted attempt (a few hundred nanoseconds under the pool's lock), and
only when no key is eligible does it wait, in a helper thread blocked on the
pool's futex, for a release, a cooldown expiry, a key added or the timeout.
The grant is handed to the loop with call_soon_threadsafe, so a waiting
coroutine resumes within a millisecond or so of the key becoming available.

Cancelling a waiting coroutine triggers its cancel token, which ends the
helper's wait; if a key was granted in the meantime, it is cancelled
(Lease::Cancel: no outcome counted), so nothing leaks.

The other calls are coroutines for compatibility but never block: they
take the pool's lock for well under a microsecond.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any, AsyncIterator, Optional

from .. import _core, _lib
from .._base import PoolBase, end_quietly, key_ops, reporting


class _Waiter:
    """One acquire waiting in a helper thread, handed over to the event loop.

    The hand-over is exactly-once: whichever side learns last that the other
    gave up (the coroutine cancelled, or the loop gone) cancels the granted
    lease, so a key granted to a waiter nobody awaits any more is never kept.
    """

    def __init__(self, core: "_core.Core", loop: asyncio.AbstractEventLoop) -> None:
        self.core = core
        self.loop = loop
        self.future: "asyncio.Future[str]" = loop.create_future()
        self.token = core.new_token()
        self.lock = threading.Lock()
        self.result: Any = None     # (rc, Key or error) once the wait ended
        self.abandoned = False      # the coroutine gave up
        self.consumed = False       # the result was taken or given back

    def run(self, timeout: Optional[float], tokens: int = 0) -> None:  # helper thread
        rc, value = self.core.acquire_rc(timeout, self.token, tokens)
        with self.lock:
            self.result = (rc, value)
            give_back = self.abandoned
            if give_back:
                self.consumed = True
        if give_back:
            self._give_back(rc, value)
            return
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed
            self.abandon()

    def _deliver(self) -> None:  # loop thread
        with self.lock:
            if self.consumed:
                return
            self.consumed = True
            rc, value = self.result
            late = self.future.done()
        if late:
            self._give_back(rc, value)
        elif rc == _lib.OK:
            self.future.set_result(value)
        else:
            self.future.set_exception(value)

    def abandon(self) -> None:
        """The coroutine was cancelled (or the loop is gone): it will never use the key."""
        take: Any = None
        with self.lock:
            self.abandoned = True
            pending = self.result is None
            if not pending and not self.consumed:
                self.consumed = True
                take = self.result
            elif not pending and self.future.done() and not self.future.cancelled() \
                    and self.future.exception() is None:
                # Delivered, but the task was cancelled before it resumed.
                take = (_lib.OK, self.future.result())
        if pending:
            self.token.trigger()
        elif take is not None:
            self._give_back(*take)

    def _give_back(self, rc: int, value: Any) -> None:
        if rc == _lib.OK:
            end_quietly(self.core.cancel, value, swallow_all=True)


class KeyPool(PoolBase):
    """The asyncio pool. Same constructor and ``connect`` as SyncKeyPool.

    One KeyPool may be used from several event loops and threads at once.
    """

    _owner = "KeyPool"

    async def acquire(self, timeout: Optional[float] = None, tokens: int = 0) -> str:
        """As SyncKeyPool.acquire; never blocks the event loop."""
        core = self._core
        key = core.native.poll(tokens)  # the extension: one uncounted attempt, GIL held
        if key is not None:
            return key
        if timeout is not None and timeout <= 0:
            return core.acquire(0.0, None, tokens)  # one counted attempt, never waits
        loop = asyncio.get_running_loop()
        waiter = _Waiter(core, loop)
        threading.Thread(target=waiter.run, args=(timeout, tokens), name="keymesh-acquire", daemon=True).start()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            waiter.abandon()
            raise

    async def release(self, key: str, latency: Optional[float] = None, tokens: int = 0) -> None:
        self._core.native.release(key, latency, tokens)

    async def mark_failed(self, key: str, permanent: bool = False) -> None:
        self._core.native.mark_failed(key, permanent)

    async def mark_rate_limited(self, key: str, cooldown: Optional[float] = None) -> None:
        self._core.native.mark_rate_limited(key, cooldown)

    async def cancel(self, key: str) -> None:
        self._core.native.cancel(key)

    @contextlib.asynccontextmanager
    async def lease(self, timeout: Optional[float] = None) -> AsyncIterator[str]:
        """As SyncKeyPool.lease; a cancelled task cancels the lease (no outcome)."""
        key = await self.acquire(timeout)
        with reporting(self._core, key):
            yield key

    async def add_key(self, key: str, name: Optional[str] = None, **limits: Any) -> None:
        self._core.add_key(key, name, **limits)

    remove_key, enable_key, disable_key, reset_key = key_ops(asynchronous=True)

    async def close(self) -> None:
        """Idempotent. Waiting acquires raise PoolClosedError."""
        aclose = getattr(self._core, "aclose", None)  # py-storage: a storage= pool flushes off the loop
        if aclose is not None:
            await aclose()
            return
        self._core.close()

    async def __aenter__(self) -> "KeyPool":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()


__all__ = ["KeyPool"]
