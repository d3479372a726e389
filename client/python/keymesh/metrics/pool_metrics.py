"""PoolMetrics: the original's pool counters, standalone and locked.

KeyMesh's pools do not use this class: their counters live in shared memory
and are pool-wide (every process; every host process of a broker pool).
``pool.status()["pool_metrics"]`` reports them with the original's names
(total_acquires, total_releases, total_failures, total_cooldowns,
no_key_available_count, uptime_seconds) and KeyMesh's (total_rate_limited,
uptime, timeouts, ...). There, no_key_available_count counts failed
acquires once each, not polls (the original's defect 2).
"""
from __future__ import annotations

import threading
import time
from typing import Dict, Union

__all__ = ["PoolMetrics"]

COUNTERS = ("total_acquires", "total_releases", "total_failures", "total_cooldowns", "total_retries",
            "no_key_available_count")


class PoolMetrics:
    """Six counters and a start time; every method is thread-safe (defect 12)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.start_time = time.monotonic()
        self.total_acquires = 0
        self.total_releases = 0
        self.total_failures = 0
        self.total_cooldowns = 0
        self.total_retries = 0
        self.no_key_available_count = 0

    def record_acquire(self) -> None:
        with self._lock:
            self.total_acquires += 1

    def record_release(self) -> None:
        with self._lock:
            self.total_releases += 1

    def record_failure(self) -> None:
        with self._lock:
            self.total_failures += 1

    def record_cooldown(self) -> None:
        with self._lock:
            self.total_cooldowns += 1

    def record_retry(self) -> None:
        with self._lock:
            self.total_retries += 1

    def record_no_key(self) -> None:
        with self._lock:
            self.no_key_available_count += 1

    @property
    def uptime_seconds(self) -> float:
        return time.monotonic() - self.start_time

    def snapshot(self) -> Dict[str, Union[int, float]]:
        """``{"uptime_seconds": <2 dp>, <the six counters>}``, one consistent reading."""
        with self._lock:
            out: Dict[str, Union[int, float]] = {"uptime_seconds": round(self.uptime_seconds, 2)}
            for name in COUNTERS:
                out[name] = getattr(self, name)
            return out
