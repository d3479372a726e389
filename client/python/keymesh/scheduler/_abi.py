"""The C ABI calls of schedulers outside the pool (keymesh.h, "Schedulers
outside the pool"): km_pool_snapshot, km_pool_acquire_this_key,
km_pool_wait_change, through ctypes (this is not the fast path).
Internal to keymesh.scheduler."""
from __future__ import annotations

import ctypes
import time
from typing import Any, List, Optional, Tuple

from .. import _core, _lib
from .._lib import check
from .view import KeyView

NAME_CAPACITY = 64


class KeyViewStruct(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("slot", ctypes.c_uint32), ("generation", ctypes.c_uint64),
                ("fingerprint", ctypes.c_uint64), ("name", ctypes.c_char * NAME_CAPACITY),
                ("secret", ctypes.c_char_p), ("eligible", ctypes.c_uint32), ("in_flight", ctypes.c_uint32),
                ("max_concurrency", ctypes.c_uint32), ("weight", ctypes.c_uint32),
                ("fail_streak", ctypes.c_uint32), ("has_latency", ctypes.c_uint32),
                ("successes", ctypes.c_uint64), ("failures", ctypes.c_uint64),
                ("cooldown_remaining", ctypes.c_double), ("latency_avg", ctypes.c_double),
                ("last_used_ago", ctypes.c_double)]


class SnapshotInfo(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("count", ctypes.c_uint32), ("generation", ctypes.c_uint64),
                ("wake_seq", ctypes.c_uint32), ("max_failures", ctypes.c_uint32), ("next_change", ctypes.c_double),
                ("strategy", ctypes.c_int32)]


_P = ctypes.c_void_p
km_key_view_init = _lib._sig("km_key_view_init", ctypes.POINTER(KeyViewStruct))
km_snapshot_info_init = _lib._sig("km_snapshot_info_init", ctypes.POINTER(SnapshotInfo))
km_pool_snapshot = _lib._sig("km_pool_snapshot", _P, ctypes.POINTER(KeyViewStruct), ctypes.c_size_t,
                             ctypes.POINTER(SnapshotInfo))
km_pool_acquire_this_key = _lib._sig("km_pool_acquire_this_key", _P, ctypes.POINTER(KeyViewStruct),
                                     ctypes.POINTER(_lib.AcquireOptions), ctypes.POINTER(_lib.Held))
km_pool_wait_change = _lib._sig("km_pool_wait_change", _P, ctypes.c_uint32, ctypes.c_double, _P)


class Snapshot:
    """One km_pool_snapshot: the views of every key, and what waiting needs."""

    __slots__ = ("views", "wake_seq", "next_change", "max_failures")

    def __init__(self, views: List[KeyView], wake_seq: int, next_change: float, max_failures: int) -> None:
        self.views = views
        self.wake_seq = wake_seq
        self.next_change = next_change
        self.max_failures = max_failures


class Snapshotter:
    """Takes snapshots of one Core into a buffer it grows as the pool grows."""

    def __init__(self, core: "_core.Core") -> None:
        self._core = core
        self._capacity = 0
        self._buffer: Any = None
        self._grow(16)

    def _grow(self, n: int) -> None:
        buf = (KeyViewStruct * n)()
        check(km_key_view_init(buf))  # the first element's struct_size is the array's stride
        self._buffer, self._capacity = buf, n

    def take(self) -> Snapshot:
        info = SnapshotInfo()
        check(km_snapshot_info_init(ctypes.byref(info)))
        while True:
            check(km_pool_snapshot(self._core.handle, self._buffer, self._capacity, ctypes.byref(info)))
            if info.count <= self._capacity:
                break
            self._grow(max(info.count, 2 * self._capacity))
        now = time.monotonic()
        views = []
        for i in range(info.count):
            v = self._buffer[i]
            secret = v.secret.decode("utf-8", "surrogateescape") if v.secret is not None else ""
            views.append(KeyView(
                key=secret, name=v.name.decode("utf-8", "replace"), weight=v.weight,
                active_requests=v.in_flight, max_concurrency=v.max_concurrency,
                cooldown_until=now + v.cooldown_remaining if v.cooldown_remaining > 0 else 0.0,
                success_count=v.successes, failure_count=v.failures, failure_streak=v.fail_streak,
                latency_avg=v.latency_avg if v.has_latency else 0.0, has_latency=bool(v.has_latency),
                last_used=max(now - v.last_used_ago, 0.0) if v.last_used_ago >= 0 else 0.0,
                max_failures=info.max_failures, available=bool(v.eligible),
                identity=(v.slot, v.generation, v.fingerprint)))
        return Snapshot(views, info.wake_seq, info.next_change, info.max_failures)


def acquire_this(core: "_core.Core", view: KeyView, tokens: int) -> Tuple[int, Optional["_core.Key"]]:
    """(rc, Key): OK, NO_AVAILABLE_KEY (no longer eligible), UNKNOWN_KEY (stale:
    keys were added or removed since), or another code (the caller raises)."""
    ident = KeyViewStruct()
    check(km_key_view_init(ctypes.byref(ident)))
    ident.slot, ident.generation, ident.fingerprint = view._identity
    opts = _lib.init(_lib.AcquireOptions)
    opts.tokens = _core._tokens(tokens)
    held = _lib.Held()
    rc = km_pool_acquire_this_key(core.handle, ctypes.byref(ident), ctypes.byref(opts), ctypes.byref(held))
    return rc, (_core.Key._of(held) if rc == _lib.OK else None)


def wait_change(core: "_core.Core", wake_seq: int, timeout: float, token: Optional["_core.CancelToken"]) -> None:
    """Sleeps until a change after the snapshot of ``wake_seq``, the next
    cooldown or budget deadline, or ``timeout``. PoolClosedError when the pool
    is closed or ``token`` triggered. The GIL is released meanwhile."""
    check(km_pool_wait_change(core.handle, wake_seq, max(0.0, min(timeout, _core.MAX_SECONDS)),
                              token._handle if token is not None else None))
