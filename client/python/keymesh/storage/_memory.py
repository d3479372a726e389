"""The dict both memory storages keep (keyed by storage id, as the JSON file)."""
from __future__ import annotations

import threading
from typing import Any, Dict, Mapping, Optional

from . import _forksafe
from .base import storage_id


class MemoryTable:
    """storage id -> a copy of the snapshot; thread-safe, fork-safe (a child
    keeps the parent's entries as they were at fork)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: Dict[str, Dict[str, Any]] = {}
        _forksafe.register(self)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()

    def save_many(self, states: Mapping[str, Dict[str, Any]]) -> None:
        copies = {storage_id(k): dict(v) for k, v in states.items()}
        with self._lock:
            self._data.update(copies)

    def load(self, key: str) -> Optional[Dict[str, Any]]:
        with self._lock:
            state = self._data.get(storage_id(key))
        return dict(state) if state is not None else None

    def load_all(self) -> Dict[str, Dict[str, Any]]:
        with self._lock:
            return {k: dict(v) for k, v in self._data.items()}

    def delete(self, key: str) -> None:
        with self._lock:
            self._data.pop(storage_id(key), None)
