"""Restore on start: an embedded pool created with ``storage=`` loads the
stored snapshots and writes each known key's counters, latency average and
remaining cooldown into the segment (km_pool_restore_key).

The remaining cooldown is computed from the wall-clock time of the save
(``saved_at``, a field KeyMesh adds after the original's): the original's
``cooldown_until`` is a monotonic reading of a process that is gone, so a
file written by the original restores counters and latency, not cooldowns.
The library caps a cooldown at max(max_cooldown, default_cooldown), so a
wall clock that went back never benches a key for longer than that.

Every stored value is untrusted (another process, or a person, may have
written the file): an entry with a value of the wrong type or out of range
is a logged error for that entry and is skipped; the other keys are
restored. Streaks are not restored: the original's ``failure_count`` is a
lifetime count (defect 3), and a restored file must never exhaust a key.

Attached pools are not restored: the broker's state file is the
authority for them (keymesh-broker restores it when it starts).
"""
from __future__ import annotations

import ctypes
import logging
import math
import time
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

from .. import _lib
from ..exceptions import KeyMeshError
from .base import storage_id

log = logging.getLogger("keymesh")

U64 = (1 << 64) - 1
MAX_SECONDS = 1e9


class KeyRestore(ctypes.Structure):
    """km_key_restore (keymesh.h)."""
    _fields_ = [("struct_size", ctypes.c_uint32), ("has_latency", ctypes.c_uint32),
                ("success_count", ctypes.c_uint64), ("failure_count", ctypes.c_uint64),
                ("rate_limited_count", ctypes.c_uint64), ("latency_avg", ctypes.c_double),
                ("cooldown_remaining", ctypes.c_double)]


km_key_restore_init = _lib._sig("km_key_restore_init", ctypes.POINTER(KeyRestore))
km_pool_restore_key = _lib._sig("km_pool_restore_key", ctypes.c_void_p, ctypes.c_char_p,
                                ctypes.POINTER(KeyRestore))


class EntryError(ValueError):
    """A stored entry that cannot be restored (the message names the field)."""


def _count(entry: Mapping[str, Any], field: str, required: bool = True) -> int:
    v = entry.get(field)
    if v is None and not required:
        return 0
    if isinstance(v, bool) or not isinstance(v, int):
        raise EntryError(f"{field} must be an integer, not {type(v).__name__}")
    if not 0 <= v <= U64:
        raise EntryError(f"{field} must be between 0 and {U64}")
    return v


def _seconds(entry: Mapping[str, Any], field: str, lo: float = 0.0, hi: float = MAX_SECONDS) -> Optional[float]:
    v = entry.get(field)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise EntryError(f"{field} must be a number, not {type(v).__name__}")
    f = float(v)
    if not math.isfinite(f) or not lo <= f <= hi:
        raise EntryError(f"{field} must be a finite number between {lo:g} and {hi:g}")
    return f


def restore_args(entry: Any, now_wall: float) -> KeyRestore:
    """The km_key_restore of one stored snapshot; EntryError when a value is bad."""
    if not isinstance(entry, Mapping):
        raise EntryError(f"the entry is a {type(entry).__name__}, not an object")
    r = KeyRestore()
    km_key_restore_init(ctypes.byref(r))
    r.success_count = _count(entry, "success_count")
    r.failure_count = _count(entry, "failure_count")
    r.rate_limited_count = _count(entry, "rate_limited_count", required=False)
    latency = _seconds(entry, "latency_avg")
    has = entry.get("has_latency")
    if has is not None and not isinstance(has, bool):
        raise EntryError("has_latency must be true or false")
    if has is None:  # the original's file: 0.0 meant "no sample yet"
        has = latency is not None and latency > 0
    if has:
        if latency is None:
            raise EntryError("has_latency is true but latency_avg is missing")
        r.has_latency = 1
        r.latency_avg = latency
    saved_at = _seconds(entry, "saved_at", hi=1e11)
    remaining = _seconds(entry, "cooldown_remaining")
    if saved_at is not None and remaining:
        # A clock that went back (now < saved_at) counts as no time elapsed.
        r.cooldown_remaining = max(0.0, remaining - max(0.0, now_wall - saved_at))
    return r


def restore(handle: Any, entries: Any, keys: Iterable[str], name_of: Callable[[str], str]) -> int:
    """Restores every key of ``keys`` (raw secrets) that ``entries`` (load_all's
    result, keyed by storage id) holds; returns how many. Never raises for a
    bad entry (logged, skipped)."""
    if not isinstance(entries, Mapping):
        log.error("keymesh: storage: load_all() returned a %s, not a mapping; nothing restored",
                  type(entries).__name__)
        return 0
    now_wall = time.time()
    restored = 0
    for secret in keys:
        sid = storage_id(secret)
        entry = entries.get(sid)
        if entry is None:
            continue
        try:
            name = name_of(secret)
            args = restore_args(entry, now_wall)
            _lib.check(km_pool_restore_key(handle, _lib.encode(name, "name"), ctypes.byref(args)))
        except (EntryError, KeyMeshError) as e:
            log.error("keymesh: storage: entry %s (key %s) not restored: %s", sid, _lib.mask_secret(secret), e)
            continue
        restored += 1
    return restored


def load_entries(call: Callable[[Callable[[], Any]], Any], storage: Any,
                 secrets: Iterable[str]) -> Optional[Dict[str, Any]]:
    """storage.load_all() through ``call`` (the writer's thread); None (logged,
    ``secrets`` masked) when it fails."""
    load_all = getattr(storage, "load_all", None)
    if not callable(load_all):
        return None  # a save-only storage: nothing to restore
    try:
        entries = call(load_all)
    except Exception as e:  # a user's storage may raise anything
        text = str(e)
        for s in secrets:
            if s and s in text:
                text = text.replace(s, _lib.mask_secret(s))
        log.error("keymesh: storage: %s.load_all() failed, nothing restored: %s", type(storage).__name__, text)
        return None
    return entries  # type: ignore[no-any-return]
