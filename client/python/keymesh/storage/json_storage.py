"""JSONStorage: the asyncio twin of SyncJSONStorage."""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Dict, Mapping, Optional

from ._jsonfile import JSONFile, PathArg
from .base import BaseStorage

__all__ = ["JSONStorage"]


class JSONStorage(BaseStorage):
    """As SyncJSONStorage (same file format and locking), with its file I/O
    in a worker thread (asyncio.to_thread): a coroutine never blocks its
    event loop (the original did blocking I/O in the loop: defect 18)."""

    def __init__(self, path: PathArg = "keymesh_state.json") -> None:
        self._file = JSONFile(path)

    @property
    def path(self) -> str:
        return self._file.path

    async def save(self, key: str, state: Dict[str, Any]) -> None:
        await asyncio.to_thread(self._file.save_many, {key: dict(state)})

    async def save_many(self, states: Mapping[str, Dict[str, Any]]) -> None:
        await asyncio.to_thread(self._file.save_many, {k: dict(v) for k, v in states.items()})

    async def _km_save_fresh(self, make_states: Callable[[], Mapping[str, Dict[str, Any]]]) -> None:
        """The pool writer's save: snapshots read under the file lock (JSONFile.save_fresh)."""
        await asyncio.to_thread(self._file.save_fresh, make_states)

    async def load(self, key: str) -> Optional[Dict[str, Any]]:
        return await asyncio.to_thread(self._file.load, key)

    async def load_all(self) -> Dict[str, Dict[str, Any]]:
        return await asyncio.to_thread(self._file.load_all)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._file.delete, key)
