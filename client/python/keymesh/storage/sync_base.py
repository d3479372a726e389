"""BaseSyncStorage: the original's synchronous storage interface (the same
five methods as BaseStorage, plain calls). See keymesh/storage/base.py."""
from __future__ import annotations

import abc
from typing import Any, Dict, Mapping, Optional

__all__ = ["BaseSyncStorage"]


class BaseSyncStorage(abc.ABC):
    """A synchronous storage backend; ``load_all`` is keyed by storage id."""

    @abc.abstractmethod
    def save(self, key: str, state: Dict[str, Any]) -> None:
        """Stores ``state`` (a snapshot dict) for ``key``, replacing the previous one."""

    @abc.abstractmethod
    def load(self, key: str) -> Optional[Dict[str, Any]]:
        """The snapshot stored for ``key``, or None."""

    @abc.abstractmethod
    def load_all(self) -> Dict[str, Dict[str, Any]]:
        """Every stored snapshot, keyed by storage id."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Forgets ``key`` (no error when it is not stored)."""

    def save_many(self, states: Mapping[str, Dict[str, Any]]) -> None:
        """Stores several keys' snapshots (raw key -> snapshot) at once; the
        default calls ``save`` for each."""
        for key, state in states.items():
            self.save(key, state)

    def close(self) -> None:
        """Releases what the storage holds. The default does nothing."""
