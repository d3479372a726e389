"""BaseStorage: the original's asyncio storage interface, and what every
storage shares: the storage id of a key and StorageError.

A storage keeps one snapshot (a dict, the original's per-key snapshot shape)
per key, under the key's *storage id*: the first 16 hex digits of the
SHA-256 of the raw key, never the raw key itself (the original's JSON file
format; the memory storages use the same ids, so ``load_all()`` is keyed the
same way by every backend).

A pool given ``storage=`` calls ``save(raw_key, snapshot)`` after each
release, mark_failed and mark_rate_limited, from a background writer thread
(keymesh/storage/_writer.py), never from the caller's thread; an async
storage's coroutines run on that writer's own event loop.
"""
from __future__ import annotations

import abc
import hashlib
from typing import Any, Dict, Mapping, Optional

from ..exceptions import KeyMeshError

__all__ = ["BaseStorage", "StorageError", "storage_id"]


class StorageError(KeyMeshError):
    """A storage could not be read or written (e.g. a corrupt JSON file, which
    is then kept aside under another name, never overwritten)."""


def storage_id(key: str) -> str:
    """The id a key is stored under: the first 16 hex digits of SHA-256 of the
    raw key (UTF-8), as the original JSONStorage wrote it."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]


class BaseStorage(abc.ABC):
    """An asyncio storage backend (the original's ABC; every method is a coroutine).

    ``save``/``load``/``delete`` take the raw key; ``load_all`` returns every
    stored snapshot keyed by storage id (``storage_id(key)``).
    """

    @abc.abstractmethod
    async def save(self, key: str, state: Dict[str, Any]) -> None:
        """Stores ``state`` (a snapshot dict) for ``key``, replacing the previous one."""

    @abc.abstractmethod
    async def load(self, key: str) -> Optional[Dict[str, Any]]:
        """The snapshot stored for ``key``, or None."""

    @abc.abstractmethod
    async def load_all(self) -> Dict[str, Dict[str, Any]]:
        """Every stored snapshot, keyed by storage id."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Forgets ``key`` (no error when it is not stored)."""

    async def save_many(self, states: Mapping[str, Dict[str, Any]]) -> None:
        """Stores several keys' snapshots (raw key -> snapshot) at once; the
        writer calls it with everything that changed since its last write.
        The default calls ``save`` for each; backends that can write them in
        one go (JSONStorage: one read-modify-write) override it."""
        for key, state in states.items():
            await self.save(key, state)

    async def close(self) -> None:
        """Releases what the storage holds. The default does nothing."""
