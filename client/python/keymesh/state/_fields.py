"""What KeyState and SyncKeyState share: the fields, the derived
properties, the snapshot and the mutations themselves.

Each mutation runs under ``_guard``, a threading.Lock held only for a few
field updates (never across an await or any I/O), so one state object may be
mutated from several threads, and from coroutines of several event loops,
and stay consistent.

The original's defects fixed here (original-semantics.md §4):
- 3: ``consecutive_failures`` is the failure streak that ``max_failures``
  bounds, as in KeyMesh's pools; a success ends it. ``failure_count`` stays
  the cumulative count (it feeds ``health_score``, as in status()).
- 5: a cooldown (a 429) leaves the failure counts alone.
- 15: the latency EMA is seeded by its first sample (counted in
  ``latency_samples``), so a 0.0 sample is a sample and "no latency" is None.
- 20: the key is masked with keymesh.utils.helpers.mask_key everywhere.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Any, Dict, Optional

from ..exceptions import ConfigError
from ..utils.helpers import mask_key

EMA_ALPHA = 0.2  # weight of a new latency sample, as the original


def _duration(value: Any, what: str) -> float:
    """A finite number of seconds >= 0 (ConfigError, a ValueError, otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{what} must be a number of seconds, not {type(value).__name__}")
    v = float(value)
    if not (math.isfinite(v) and v >= 0.0):
        raise ConfigError(f"{what} must be a finite number of seconds >= 0, not {v!r}")
    return v


class KeyStateFields:
    """The per-key state of the original package (standalone: KeyMesh's pools
    keep theirs in shared memory). Times are time.monotonic() seconds."""

    __slots__ = ("key", "max_failures", "active_requests", "cooldown_until", "success_count",
                 "failure_count", "consecutive_failures", "latency_avg", "latency_samples",
                 "last_used", "_guard", "__weakref__")

    def __init__(self, key: str, max_failures: int = 10) -> None:
        if not isinstance(key, str) or not key:
            raise ConfigError("an API key must be a non-empty str")
        if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < 1:
            raise ConfigError(f"max_failures must be an integer >= 1, not {max_failures!r}")
        self.key = key
        self.max_failures = max_failures
        self.active_requests = 0
        self.cooldown_until = 0.0
        self.success_count = 0
        self.failure_count = 0
        self.consecutive_failures = 0
        self.latency_avg = 0.0
        self.latency_samples = 0
        self.last_used = 0.0
        self._guard = threading.Lock()

    # ---- derived, lock-free reads -------------------------------------
    @property
    def is_cooling_down(self) -> bool:
        return time.monotonic() < self.cooldown_until

    @property
    def cooldown_remaining(self) -> float:
        return max(0.0, self.cooldown_until - time.monotonic())

    @property
    def is_exhausted(self) -> bool:
        """The failure streak reached max_failures (a success or reset_failures() ends it)."""
        return self.consecutive_failures >= self.max_failures

    @property
    def is_available(self) -> bool:
        return not self.is_cooling_down and not self.is_exhausted

    @property
    def health_score(self) -> float:
        """success rate x 1/(1 + latency_avg), 0 when unavailable; in [0, 1]."""
        if not self.is_available:
            return 0.0
        total = self.success_count + self.failure_count
        rate = 1.0 if total == 0 else self.success_count / total
        return rate / (1.0 + self.latency_avg)

    # ---- mutations (callers: the public mutators of the two classes) ----
    def _increment_active(self) -> None:
        with self._guard:
            self.active_requests += 1
            self.last_used = time.monotonic()

    def _decrement_active(self) -> None:
        with self._guard:
            self.active_requests = max(0, self.active_requests - 1)

    def _record_success(self, latency: Optional[float]) -> None:
        lat = None if latency is None else _duration(latency, "latency")
        with self._guard:
            self.success_count += 1
            self.consecutive_failures = 0
            self.active_requests = max(0, self.active_requests - 1)
            if lat is not None:
                self.latency_avg = lat if self.latency_samples == 0 else (
                    EMA_ALPHA * lat + (1.0 - EMA_ALPHA) * self.latency_avg)
                self.latency_samples += 1

    def _record_failure(self) -> None:
        with self._guard:
            self.failure_count += 1
            self.consecutive_failures += 1
            self.active_requests = max(0, self.active_requests - 1)

    def _apply_cooldown(self, duration: float) -> None:
        d = _duration(duration, "duration")
        with self._guard:
            # A new cooldown replaces the old one, as the original; a 429 ends
            # the request but is not a failure.
            self.cooldown_until = time.monotonic() + d
            self.active_requests = max(0, self.active_requests - 1)

    def _reset_failures(self) -> None:
        with self._guard:
            self.consecutive_failures = 0

    # ---- reads ----------------------------------------------------------
    def snapshot(self) -> Dict[str, Any]:
        """The original's per-key snapshot (same fields, same order, same
        rounding), taken under the lock so it is one consistent state, plus
        ``consecutive_failures`` and ``latency_samples`` at the end."""
        with self._guard:
            t = time.monotonic()
            cooling = t < self.cooldown_until
            available = not cooling and self.consecutive_failures < self.max_failures
            total = self.success_count + self.failure_count
            rate = 1.0 if total == 0 else self.success_count / total
            health = rate / (1.0 + self.latency_avg) if available else 0.0
            return {
                "key_suffix": mask_key(self.key),
                "active_requests": self.active_requests,
                "cooldown_until": self.cooldown_until,
                "cooldown_remaining": round(max(0.0, self.cooldown_until - t), 2),
                "success_count": self.success_count,
                "failure_count": self.failure_count,
                "latency_avg": round(self.latency_avg, 4),
                "last_used": self.last_used,
                "is_available": available,
                "health_score": round(health, 4),
                "consecutive_failures": self.consecutive_failures,
                "latency_samples": self.latency_samples,
            }

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(key={mask_key(self.key)!r}, active={self.active_requests}, "
                f"available={self.is_available}, health={self.health_score:.3f})")
