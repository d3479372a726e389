"""SyncKeyState: the original's per-key state for threaded code."""
from __future__ import annotations

from typing import Optional

from ._fields import KeyStateFields

__all__ = ["SyncKeyState"]


class SyncKeyState(KeyStateFields):
    """``SyncKeyState(key, max_failures=10)``: KeyState with plain methods, each
    taking the per-key threading.Lock; safe to share between threads."""

    __slots__ = ()

    def increment_active(self) -> None:
        """A request starts: active_requests + 1, last_used = now."""
        self._increment_active()

    def decrement_active(self) -> None:
        """A request ends without an outcome (active_requests clamps at 0)."""
        self._decrement_active()

    def record_success(self, latency: Optional[float] = None) -> None:
        """A success: ends the failure streak; ``latency`` (seconds) feeds the
        EMA (alpha 0.2, seeded by the first sample); None adds no sample."""
        self._record_success(latency)

    def record_failure(self) -> None:
        """A failure: failure_count and the streak + 1 (exhausted at max_failures)."""
        self._record_failure()

    def apply_cooldown(self, duration: float = 60.0) -> None:
        """A 429: cooling for ``duration`` seconds from now (replacing any
        cooldown); the request ends; failures are left as they are."""
        self._apply_cooldown(duration)

    def reset_failures(self) -> None:
        """Ends the failure streak (re-admits an exhausted key)."""
        self._reset_failures()
