"""MemoryStorage: the asyncio twin of SyncMemoryStorage."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from ._memory import MemoryTable
from .base import BaseStorage

__all__ = ["MemoryStorage"]


class MemoryStorage(BaseStorage):
    """Snapshots in a dict of this process, keyed by storage id; stores
    copies. Its coroutines never block (a dict update under a short lock),
    and it may be used from several event loops and threads."""

    def __init__(self) -> None:
        self._table = MemoryTable()

    async def save(self, key: str, state: Dict[str, Any]) -> None:
        self._table.save_many({key: state})

    async def save_many(self, states: Mapping[str, Dict[str, Any]]) -> None:
        self._table.save_many(states)

    async def load(self, key: str) -> Optional[Dict[str, Any]]:
        return self._table.load(key)

    async def load_all(self) -> Dict[str, Dict[str, Any]]:
        return self._table.load_all()

    async def delete(self, key: str) -> None:
        self._table.delete(key)
