"""KeyView: the read-only view of one key that a custom scheduler's
``select(candidates)`` chooses among.

It carries the original ``KeyState``'s field and property names, filled from
one snapshot of the shared pool (km_pool_snapshot) taken outside the pool's
lock. The times are this process's monotonic clock, as the original's were:
``cooldown_until`` and ``last_used`` are ``time.monotonic()`` values.
A view never changes and cannot be assigned: the pool does every mutation,
atomically, when it acquires the chosen key.
"""
from __future__ import annotations

import time
from typing import Any, Dict, NoReturn, Tuple

from .._lib import mask_secret

# What identifies the key for acquire-this-key: (slot, generation, fingerprint).
KeyIdentity = Tuple[int, int, int]


class KeyView:
    """One key of the pool as a scheduler sees it (read-only)."""

    __slots__ = ("key", "name", "weight", "active_requests", "max_concurrency", "cooldown_until", "success_count",
                 "failure_count", "failure_streak", "latency_avg", "has_latency", "last_used", "max_failures",
                 "_available", "_identity")

    key: str
    name: str
    weight: int
    active_requests: int
    max_concurrency: int
    cooldown_until: float
    success_count: int
    failure_count: int
    failure_streak: int
    latency_avg: float
    has_latency: bool
    last_used: float
    max_failures: int
    _available: bool
    _identity: KeyIdentity

    def __init__(self, *, key: str, name: str, weight: int = 1, active_requests: int = 0, max_concurrency: int = 0,
                 cooldown_until: float = 0.0, success_count: int = 0, failure_count: int = 0,
                 failure_streak: int = 0, latency_avg: float = 0.0, has_latency: bool = False,
                 last_used: float = 0.0, max_failures: int = 10, available: bool = True,
                 identity: KeyIdentity = (0, 0, 0)) -> None:
        """Views are made by the pool from a snapshot; tests and tools may make
        their own (e.g. to exercise a scheduler's ``select``)."""
        put = object.__setattr__
        put(self, "key", key)
        put(self, "name", name)
        put(self, "weight", weight)
        put(self, "active_requests", active_requests)
        put(self, "max_concurrency", max_concurrency)
        put(self, "cooldown_until", cooldown_until)
        put(self, "success_count", success_count)
        put(self, "failure_count", failure_count)
        put(self, "failure_streak", failure_streak)
        put(self, "latency_avg", latency_avg)
        put(self, "has_latency", has_latency)
        put(self, "last_used", last_used)
        put(self, "max_failures", max_failures)
        put(self, "_available", available)
        put(self, "_identity", identity)

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise AttributeError(f"KeyView is read-only (cannot set {name!r}): a scheduler only chooses; "
                             "the pool changes the key's state when it acquires it")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"KeyView is read-only (cannot delete {name!r})")

    # ---- the original KeyState's derived properties -------------------------
    @property
    def is_cooling_down(self) -> bool:
        return self.cooldown_until > time.monotonic()

    @property
    def cooldown_remaining(self) -> float:
        return max(0.0, self.cooldown_until - time.monotonic())

    @property
    def is_exhausted(self) -> bool:
        """max_failures consecutive failures (the original counted all of them)."""
        return self.failure_streak >= self.max_failures

    @property
    def is_available(self) -> bool:
        """Every check an acquire makes passed at the snapshot (enabled, cooldown,
        circuit, concurrency cap, rate budget). True for every candidate."""
        return self._available

    @property
    def health_score(self) -> float:
        """success rate x 1 / (1 + latency_avg), 0 when not available (the original's)."""
        if not self._available:
            return 0.0
        total = self.success_count + self.failure_count
        rate = 1.0 if total == 0 else self.success_count / total
        return rate / (1.0 + self.latency_avg)

    def snapshot(self) -> Dict[str, Any]:
        """The original KeyState.snapshot() fields; the key masked."""
        return {
            "key_suffix": mask_secret(self.key),
            "active_requests": self.active_requests,
            "cooldown_until": self.cooldown_until,
            "cooldown_remaining": round(self.cooldown_remaining, 2),
            "success_count": self.success_count,
            "failure_count": self.failure_count,
            "latency_avg": round(self.latency_avg, 4),
            "last_used": self.last_used,
            "is_available": self.is_available,
            "health_score": round(self.health_score, 4),
        }

    def __repr__(self) -> str:
        return (f"<KeyView {self.name!r} {mask_secret(self.key)} active={self.active_requests} "
                f"available={self.is_available} health={self.health_score:.3f}>")


__all__ = ["KeyView", "KeyIdentity"]
