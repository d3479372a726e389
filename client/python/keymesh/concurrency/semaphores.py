"""SemaphoreGroup: a per-key asyncio.Semaphore of ``max_concurrent`` slots.

Fixes the original's defect 9: the group is thread-safe (one lock around
its table), a semaphore is never shared between event loops (an
asyncio.Semaphore is bound to the first loop that waits on it, so each
running loop gets its own set, dropped when the loop is garbage-collected),
and the growth is bounded by what you ask for: one semaphore per key per
live loop, removed by ``discard(key)``. Note the cap is therefore per event
loop, i.e. per thread; a cap shared by every thread and process is a key's
``max_concurrency`` in a KeyMesh pool.

Not used by KeyMesh's pools.
"""
from __future__ import annotations

import asyncio
import threading
import weakref
from typing import Dict, Optional

from ..exceptions import ConfigError

__all__ = ["SemaphoreGroup"]


class SemaphoreGroup:
    """``SemaphoreGroup(max_concurrent=10)``; ``async with group.acquire(key): ...``."""

    def __init__(self, max_concurrent: int = 10) -> None:
        if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int) or max_concurrent < 1:
            raise ConfigError(f"max_concurrent must be an integer >= 1, not {max_concurrent!r}")
        self.max_concurrent = max_concurrent
        self._lock = threading.Lock()
        self._by_loop: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Dict[str, asyncio.Semaphore]]" = (
            weakref.WeakKeyDictionary())
        self._no_loop: Dict[str, asyncio.Semaphore] = {}

    def _table(self, loop: Optional[asyncio.AbstractEventLoop]) -> Dict[str, asyncio.Semaphore]:
        if loop is None:
            return self._no_loop
        table = self._by_loop.get(loop)
        if table is None:
            table = self._by_loop[loop] = {}
        return table

    def acquire(self, key: str) -> asyncio.Semaphore:
        """The semaphore of ``key`` for the running event loop (created on first
        use). As in the original it acquires nothing itself: use it as
        ``async with group.acquire(key):``. Called outside a loop, it returns
        a semaphore that binds to the first loop that waits on it."""
        try:
            loop: Optional[asyncio.AbstractEventLoop] = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            table = self._table(loop)
            sem = table.get(key)
            if sem is None:
                sem = table[key] = asyncio.Semaphore(self.max_concurrent)
            return sem

    def discard(self, key: str) -> None:
        """Forgets ``key``'s semaphores in every loop (holders keep theirs)."""
        with self._lock:
            self._no_loop.pop(key, None)
            for table in self._by_loop.values():
                table.pop(key, None)

    def __len__(self) -> int:
        """Semaphores held: one per key per live loop."""
        with self._lock:
            return len(self._no_loop) + sum(len(t) for t in self._by_loop.values())
