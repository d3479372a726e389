"""KeyState: the original's per-key state for asyncio code (coroutine mutators).

The mutators are coroutines, as in the original, but guard the fields with a
threading.Lock held for a few assignments rather than an asyncio.Lock: their
critical sections never await, so the lock never blocks a loop for longer
than those assignments, and unlike an asyncio.Lock (bound to the first loop
that waits on it, and not thread-safe) it keeps the state consistent when
coroutines of several threads' event loops share it.
"""
from __future__ import annotations

from typing import Optional

from ._fields import KeyStateFields

__all__ = ["KeyState"]


class KeyState(KeyStateFields):
    """``KeyState(key, max_failures=10)``; see keymesh.state for the fields."""

    __slots__ = ()

    async def increment_active(self) -> None:
        """A request starts: active_requests + 1, last_used = now."""
        self._increment_active()

    async def decrement_active(self) -> None:
        """A request ends without an outcome (active_requests clamps at 0)."""
        self._decrement_active()

    async def record_success(self, latency: Optional[float] = None) -> None:
        """A success: ends the failure streak; ``latency`` (seconds) feeds the
        EMA (alpha 0.2, seeded by the first sample); None adds no sample."""
        self._record_success(latency)

    async def record_failure(self) -> None:
        """A failure: failure_count and the streak + 1 (exhausted at max_failures)."""
        self._record_failure()

    async def apply_cooldown(self, duration: float = 60.0) -> None:
        """A 429: cooling for ``duration`` seconds from now (replacing any
        cooldown); the request ends; failures are left as they are."""
        self._apply_cooldown(duration)

    async def reset_failures(self) -> None:
        """Ends the failure streak (re-admits an exhausted key)."""
        self._reset_failures()
