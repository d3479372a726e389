"""SyncJSONStorage: snapshots in a JSON file shared safely by processes."""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional

from ._jsonfile import JSONFile, PathArg
from .sync_base import BaseSyncStorage

__all__ = ["SyncJSONStorage"]


class SyncJSONStorage(BaseSyncStorage):
    """The original's JSON file format (see keymesh/storage/_jsonfile.py),
    written atomically under a cross-process lock. A corrupt file raises
    StorageError from load/load_all (after it was kept aside); every method
    may raise StorageError on an OS error."""

    def __init__(self, path: PathArg = "keymesh_sync_state.json") -> None:
        self._file = JSONFile(path)

    @property
    def path(self) -> str:
        return self._file.path

    def save(self, key: str, state: Dict[str, Any]) -> None:
        self._file.save_many({key: state})

    def save_many(self, states: Mapping[str, Dict[str, Any]]) -> None:
        self._file.save_many(states)

    def _km_save_fresh(self, make_states: Callable[[], Mapping[str, Dict[str, Any]]]) -> None:
        """The pool writer's save: snapshots read under the file lock (JSONFile.save_fresh)."""
        self._file.save_fresh(make_states)

    def load(self, key: str) -> Optional[Dict[str, Any]]:
        return self._file.load(key)

    def load_all(self) -> Dict[str, Dict[str, Any]]:
        return self._file.load_all()

    def delete(self, key: str) -> None:
        self._file.delete(key)
