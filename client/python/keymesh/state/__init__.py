"""The original package's per-key state objects, standalone.

``KeyState`` (coroutine mutators) and ``SyncKeyState`` (plain methods) hold
the fields ``key``, ``max_failures``, ``active_requests``, ``cooldown_until``,
``success_count``, ``failure_count``, ``consecutive_failures``,
``latency_avg``, ``latency_samples``, ``last_used``; the derived
``is_cooling_down``, ``cooldown_remaining``, ``is_exhausted``,
``is_available``, ``health_score``; ``snapshot()``. KeyMesh's pools do not
use them (their state is in shared memory; see ``status()``).
"""
from ._fields import KeyStateFields
from .key_state import KeyState
from .sync_key_state import SyncKeyState

__all__ = ["KeyState", "SyncKeyState", "KeyStateFields"]
