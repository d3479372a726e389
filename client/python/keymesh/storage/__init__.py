"""Pluggable persistence of per-key state (the original's ``keymesh.storage``).

``storage=`` (SyncKeyPool/KeyPool, embedded or ``connect``) takes one of
these, or a user's own BaseStorage / BaseSyncStorage subclass. The pool then
calls ``storage.save(raw_key, snapshot)`` after every release, mark_failed
and mark_rate_limited, from a background writer (keymesh/storage/_writer.py),
and an embedded pool restores each key's counters, latency average and
remaining cooldown from ``storage.load_all()`` when it is created
(keymesh/storage/_restore.py). Without ``storage=`` nothing is saved and
nothing runs (the original defaulted to a MemoryStorage that nobody read).

Every backend keys its snapshots by storage id (``storage_id(key)``: the
first 16 hex digits of SHA-256 of the raw key), never by the raw key.
"""
from .base import BaseStorage, StorageError, storage_id
from .json_storage import JSONStorage
from .memory import MemoryStorage
from .sync_base import BaseSyncStorage
from .sync_json import SyncJSONStorage
from .sync_memory import SyncMemoryStorage

__all__ = ["BaseStorage", "BaseSyncStorage", "MemoryStorage", "SyncMemoryStorage", "JSONStorage",
           "SyncJSONStorage", "StorageError", "storage_id"]
