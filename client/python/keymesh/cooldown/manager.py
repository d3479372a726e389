"""CooldownManager: the original's static cooldown helpers over a key state.

Not used by KeyMesh's pools (their cooldowns live in shared memory and end
by themselves; use ``pool.mark_rate_limited``).
"""
from __future__ import annotations

import time
import warnings
from typing import Any

from ..state._fields import KeyStateFields, _duration

__all__ = ["CooldownManager"]


class CooldownManager:
    """Static helpers: ``apply``, ``is_expired``, ``remaining``."""

    @staticmethod
    def apply(key_state: Any, duration: float = 60.0) -> None:
        """Cools ``key_state`` for ``duration`` seconds from now (replacing any
        cooldown). On a KeyState/SyncKeyState this takes the state's lock, so
        it is safe beside its mutators; on any other object with a
        ``cooldown_until`` attribute it assigns it directly, with the
        original's DeprecationWarning (that is not concurrency-safe)."""
        d = _duration(duration, "duration")
        if isinstance(key_state, KeyStateFields):
            with key_state._guard:
                key_state.cooldown_until = time.monotonic() + d
            return
        warnings.warn("CooldownManager.apply() is not concurrency-safe. Use the key state's "
                      "apply_cooldown() (or pool.mark_rate_limited()) instead.",
                      DeprecationWarning, stacklevel=2)
        key_state.cooldown_until = time.monotonic() + d

    @staticmethod
    def is_expired(key_state: Any) -> bool:
        """True once the key's cooldown has ended (or it never had one)."""
        return bool(time.monotonic() >= float(key_state.cooldown_until))

    @staticmethod
    def remaining(key_state: Any) -> float:
        """Seconds of cooldown left, 0.0 when none."""
        return max(0.0, float(key_state.cooldown_until) - time.monotonic())
