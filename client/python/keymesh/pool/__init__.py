"""The pools, where the original package had them: ``keymesh.pool.pool``
(KeyPool, asyncio) and ``keymesh.pool.sync_pool`` (SyncKeyPool, threads and
processes). Both are also ``keymesh.KeyPool`` and ``keymesh.SyncKeyPool``."""
from .pool import KeyPool
from .sync_pool import SyncKeyPool

__all__ = ["KeyPool", "SyncKeyPool"]
