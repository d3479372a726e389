"""A pure-Python, single-process key pool of the original KeyMesh's design.

The baseline that KeyMesh is measured against: a threading.Lock, a dict of
key states, the least-busy choice as a min over the dict, cooldown after a
429, and acquire polling every 0.5 s when nothing is available (the
original's behaviour, see shared/seed/original-semantics.md 2.5). Each
process that uses it has its own independent view of the keys.
"""

from __future__ import annotations

import threading
import time


class NoKey(Exception):
    pass


class _State:
    __slots__ = ("active", "cooldown_until", "success", "failure", "latency_avg", "last_used")

    def __init__(self) -> None:
        self.active = 0
        self.cooldown_until = 0.0
        self.success = 0
        self.failure = 0
        self.latency_avg = 0.0
        self.last_used = 0.0


class OriginalPool:
    def __init__(self, keys: list[str], default_cooldown: float = 60.0, max_failures: int = 10,
                 acquire_timeout: float = 30.0) -> None:
        self._states = {k: _State() for k in keys}
        self._lock = threading.Lock()
        self._default_cooldown = default_cooldown
        self._max_failures = max_failures
        self._timeout = acquire_timeout

    def _try(self) -> str | None:
        now = time.monotonic()
        with self._lock:
            best = None
            best_key: tuple[int, float] | None = None
            for k, s in self._states.items():
                if s.cooldown_until > now or s.failure >= self._max_failures:
                    continue
                rank = (s.active, s.last_used)
                if best_key is None or rank < best_key:
                    best, best_key = k, rank
            if best is not None:
                st = self._states[best]
                st.active += 1
                st.last_used = now
            return best

    def acquire(self) -> str:
        deadline = time.monotonic() + self._timeout
        while True:
            key = self._try()
            if key is not None:
                return key
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoKey()
            time.sleep(min(0.5, remaining))

    def release(self, key: str, latency: float = 0.0) -> None:
        with self._lock:
            s = self._states[key]
            s.success += 1
            s.active = max(0, s.active - 1)
            s.latency_avg = latency if s.latency_avg == 0.0 else 0.2 * latency + 0.8 * s.latency_avg

    def mark_failed(self, key: str) -> None:
        with self._lock:
            s = self._states[key]
            s.failure += 1
            s.active = max(0, s.active - 1)

    def mark_rate_limited(self, key: str, cooldown: float | None = None) -> None:
        with self._lock:
            s = self._states[key]
            s.cooldown_until = time.monotonic() + (self._default_cooldown if cooldown is None else cooldown)
            s.active = max(0, s.active - 1)
            s.failure = 0
