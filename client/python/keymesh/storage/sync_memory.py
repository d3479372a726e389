"""SyncMemoryStorage: snapshots kept in this process's memory."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from ._memory import MemoryTable
from .sync_base import BaseSyncStorage

__all__ = ["SyncMemoryStorage"]


class SyncMemoryStorage(BaseSyncStorage):
    """Snapshots in a dict of this process, keyed by storage id (the
    original keyed this one by the raw key: defect 19); stores copies.
    Thread-safe. A forked child starts with a copy of the parent's."""

    def __init__(self) -> None:
        self._table = MemoryTable()

    def save(self, key: str, state: Dict[str, Any]) -> None:
        self._table.save_many({key: state})

    def save_many(self, states: Mapping[str, Dict[str, Any]]) -> None:
        self._table.save_many(states)

    def load(self, key: str) -> Optional[Dict[str, Any]]:
        return self._table.load(key)

    def load_all(self) -> Dict[str, Dict[str, Any]]:
        return self._table.load_all()

    def delete(self, key: str) -> None:
        self._table.delete(key)
