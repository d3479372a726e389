"""storage=: the original's file format, saves behind the fast path, restore on start.

Every pool comes from conftest's make_pool (embedded, or attached to a
throwaway broker), so segments and temp files are removed even on failure.
"""
from __future__ import annotations

import asyncio
import glob
import hashlib
import json
import logging
import os
import threading
import time
from typing import Any, Dict, List, Optional

import pytest

import keymesh
from conftest import secret
from keymesh.storage import (BaseStorage, BaseSyncStorage, JSONStorage, MemoryStorage, StorageError,
                             SyncJSONStorage, SyncMemoryStorage, storage_id)

KEYS = [secret(i) for i in range(3)]
ORIGINAL_FIELDS = ["key_suffix", "active_requests", "cooldown_until", "cooldown_remaining", "success_count",
                   "failure_count", "latency_avg", "last_used", "is_available", "health_score"]


def flush(pool: Any) -> None:
    """Waits until the pool's writer saved every change so far."""
    assert pool._core._writer.flush(10), "the storage writer did not catch up in 10 s"


def read_json(path: Any) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)  # type: ignore[no-any-return]


class Recording(BaseSyncStorage):
    """A user's own storage: records every call."""

    def __init__(self, entries: Optional[Dict[str, Dict[str, Any]]] = None) -> None:
        self.saves: List[tuple] = []
        self.entries = entries or {}
        self.loads = 0
        self.closed = 0

    def save(self, key: str, state: Dict[str, Any]) -> None:
        self.saves.append((key, dict(state)))

    def load(self, key: str) -> Optional[Dict[str, Any]]:
        return self.entries.get(storage_id(key))

    def load_all(self) -> Dict[str, Dict[str, Any]]:
        self.loads += 1
        return dict(self.entries)

    def delete(self, key: str) -> None:
        self.entries.pop(storage_id(key), None)

    def close(self) -> None:
        self.closed += 1


# ---- the backends on their own ---------------------------------------------

def test_storage_id_is_the_originals_hash():
    assert storage_id("sk-abc") == hashlib.sha256(b"sk-abc").hexdigest()[:16]


def test_sync_backends_round_trip(tmp_path):
    for storage in (SyncMemoryStorage(), SyncJSONStorage(tmp_path / "s.json")):
        assert storage.load(KEYS[0]) is None and storage.load_all() == {}
        state = {"success_count": 1}
        storage.save(KEYS[0], state)
        state["success_count"] = 99  # a copy was stored
        assert storage.load(KEYS[0]) == {"success_count": 1}
        assert storage.load_all() == {storage_id(KEYS[0]): {"success_count": 1}}  # keyed by id, never the key
        storage.delete(KEYS[0])
        storage.delete(KEYS[1])  # not stored: no error
        assert storage.load_all() == {}
        storage.close()


def test_async_backends_round_trip_without_blocking_the_loop(tmp_path):
    async def main():
        for storage in (MemoryStorage(), JSONStorage(tmp_path / "a.json")):
            await storage.save(KEYS[1], {"failure_count": 2})
            assert await storage.load(KEYS[1]) == {"failure_count": 2}
            assert await storage.load_all() == {storage_id(KEYS[1]): {"failure_count": 2}}
            await storage.delete(KEYS[1])
            assert await storage.load(KEYS[1]) is None
            await storage.close()
    run_debug(main())


def test_default_paths_are_the_originals():
    assert os.path.basename(JSONStorage().path) == "keymesh_state.json"
    assert os.path.basename(SyncJSONStorage().path) == "keymesh_sync_state.json"


def test_corrupt_file_is_kept_aside_never_overwritten(tmp_path, caplog):
    path = tmp_path / "state.json"
    garbage = b'{"0123456789abcdef": {"success_count": 1'  # torn
    path.write_bytes(garbage)
    storage = SyncJSONStorage(path)
    with caplog.at_level(logging.ERROR, logger="keymesh"):
        with pytest.raises(StorageError, match="corrupt"):
            storage.load_all()
    aside = glob.glob(str(path) + ".corrupt-*")
    assert len(aside) == 1 and open(aside[0], "rb").read() == garbage
    assert not path.exists()
    assert any("corrupt" in r.getMessage() and aside[0] in r.getMessage() for r in caplog.records)
    # Not the file's shape (an object of objects): corrupt too.
    for bad in (b"[]", b'{"x": 3}', b"\xff\xfe"):
        path.write_bytes(bad)
        with pytest.raises(StorageError):
            storage.load(KEYS[0])
    assert len(glob.glob(str(path) + ".corrupt-*")) >= 2
    # A save over a corrupt file sets it aside first, then writes a fresh one.
    path.write_bytes(garbage)
    before = set(glob.glob(str(path) + ".corrupt-*"))
    storage.save(KEYS[0], {"success_count": 5})
    assert read_json(path) == {storage_id(KEYS[0]): {"success_count": 5}}
    new = set(glob.glob(str(path) + ".corrupt-*")) - before
    assert len(new) == 1 and open(new.pop(), "rb").read() == garbage


# ---- the pools ---------------------------------------------------------------

def test_no_storage_no_writer(make_pool):
    writers = {t for t in threading.enumerate() if t.name == "keymesh-storage"}
    pool = make_pool(KEYS)
    assert type(pool._core) is keymesh._core.Core  # the fast path is untouched
    key = pool.acquire()
    pool.release(key, latency=0.1)
    assert {t for t in threading.enumerate() if t.name == "keymesh-storage"} == writers


def test_json_file_has_the_originals_shape_and_no_secret(make_pool, tmp_path):
    path = tmp_path / "state.json"
    pool = make_pool(KEYS, storage=SyncJSONStorage(path), max_failures=5)
    k = pool.acquire()
    pool.release(k, latency=0.5)
    k2 = pool.acquire()
    pool.mark_rate_limited(k2, cooldown=30)
    k3 = pool.acquire()
    pool.mark_failed(k3)
    flush(pool)
    text = path.read_text(encoding="utf-8")
    assert os.stat(path).st_mode & 0o777 == 0o600  # its ids let a reader confirm a guessed key
    for s in KEYS:
        assert s not in text and s[-6:] not in text  # no secret, nor the original's 6-char suffix
    data = json.loads(text)
    assert text.startswith('{\n  "')  # 2-space indent
    assert set(data) == {storage_id(str(x)) for x in (k, k2, k3)}
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in data)
    for entry in data.values():
        assert list(entry)[:len(ORIGINAL_FIELDS)] == ORIGINAL_FIELDS
        assert {"name", "saved_at", "has_latency", "rate_limited_count"} <= set(entry)
    status = {e["name"]: e for e in pool.status()["keys"]}
    e = data[storage_id(str(k))]
    assert e["success_count"] == status[k.name]["success_count"] >= 1
    assert e["latency_avg"] == pytest.approx(status[k.name]["latency_avg"])
    cooled = data[storage_id(str(k2))]
    assert 25 < cooled["cooldown_remaining"] <= 30 and cooled["is_available"] is False
    assert cooled["cooldown_until"] > time.monotonic() + 20  # this process's clock, as the original's
    assert data[storage_id(str(k3))]["failure_count"] == status[k3.name]["failure_count"] >= 1


def test_user_subclass_receives_the_originals_calls(make_pool):
    storage = Recording()
    pool = make_pool(KEYS, storage=storage, max_failures=1)
    assert storage.loads == (1 if make_pool.mode == "embedded" else 0)  # restore: embedded only
    k = pool.acquire()
    pool.release(k, latency=0.25)
    flush(pool)
    k2 = pool.acquire()
    pool.mark_rate_limited(k2, cooldown=5)
    flush(pool)
    k3 = pool.acquire()
    with pytest.raises(keymesh.KeyExhaustedError):
        pool.mark_failed(k3)  # recorded, then raised
    pool.close()
    assert storage.closed == 1
    saved = {key: state for key, state in storage.saves}
    assert {str(k), str(k2), str(k3)} <= set(saved)  # the raw key, as the original passed it
    assert all(type(key) is str for key, _ in storage.saves)
    assert saved[str(k)]["success_count"] >= 1 and saved[str(k2)]["cooldown_remaining"] > 0
    assert saved[str(k3)]["failure_count"] >= 1
    pool.close()  # twice: no error, closed once


def test_failing_storage_never_breaks_the_workers_call(make_pool, caplog):
    class Broken(BaseSyncStorage):
        def save(self, key, state):
            raise RuntimeError(f"disk on fire while saving {key}")

        def load(self, key):
            raise RuntimeError(f"cannot load {key}")

        def load_all(self):
            raise RuntimeError("cannot load anything")

        def delete(self, key):
            pass

    with caplog.at_level(logging.ERROR, logger="keymesh"):
        pool = make_pool(KEYS, storage=Broken())
        k = pool.acquire()
        pool.release(k, latency=0.1)  # no exception
        k = pool.acquire()
        pool.mark_rate_limited(k, cooldown=1)
        flush(pool)
        pool.close()
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "disk on fire" in messages and "Broken" in messages
    for s in KEYS:
        assert s not in messages  # masked


def test_a_storage_must_have_save(make_pool):
    with pytest.raises(keymesh.ConfigError, match="storage"):
        make_pool(KEYS, storage=object())


def test_forked_workers_share_one_json_file(make_pool, tmp_path):
    """Four forked workers release keys at once through one file: every read
    of it parses, and it ends with each key's latest counters."""
    path = tmp_path / "state.json"
    pool = make_pool(KEYS, storage=SyncJSONStorage(path), max_failures=1000)
    reader = SyncJSONStorage(path)
    pids = []
    for w in range(4):
        pid = os.fork()
        if pid == 0:  # a worker
            code = 1
            try:
                for i in range(40):
                    k = pool.acquire(timeout=5)
                    if i % 7 == 3:
                        pool.mark_failed(k)
                    else:
                        pool.release(k, latency=0.01 * (w + 1))
                    if i % 2:
                        flush(pool)  # many writes, to make lost updates likely if they could happen
                pool.close()  # flushes this process's writer
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    reads = 0
    pending = set(pids)
    codes = []
    seen: Dict[str, int] = {}
    while pending:  # read the file while they write it
        data = reader.load_all()  # raises StorageError if it was ever torn
        for sid, entry in data.items():
            # A key's counters never go back: no process's write loses another's.
            n = entry["success_count"] + entry["failure_count"]
            assert n >= seen.get(sid, 0), f"{sid} went back from {seen[sid]} to {n}"
            seen[sid] = n
        reads += 1
        for pid in list(pending):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                pending.discard(pid)
                codes.append(os.waitstatus_to_exitcode(status))
    assert codes == [0, 0, 0, 0] and reads > 0
    data = read_json(path)
    status = {e["name"]: e for e in pool.status()["keys"]}
    total = 0
    for s in KEYS:
        entry = data.get(storage_id(s))
        if entry is None:
            continue
        st = status[entry["name"]]
        assert (entry["success_count"], entry["failure_count"]) == (st["success_count"], st["failure_count"])
        total += entry["success_count"] + entry["failure_count"]
    assert total == 160
    assert not glob.glob(str(tmp_path / "*.tmp")) and not glob.glob(str(path) + ".corrupt-*")


def test_restore_on_start(tmp_path, mode):
    if mode != "embedded":
        pytest.skip("restore is for embedded pools (see test_attached_pool_is_not_restored)")
    path = tmp_path / "state.json"
    first = keymesh.SyncKeyPool(KEYS, storage=SyncJSONStorage(path), max_failures=3)
    try:
        def both() -> Dict[str, Any]:  # key-1 and key-3, once key-2 cools
            held = [first.acquire(timeout=1) for _ in range(2)]
            return {k.name: k for k in held}
        held = {k.name: k for k in (first.acquire() for _ in range(3))}
        first.release(held["key-1"], latency=0.5)
        first.mark_rate_limited(held["key-2"], cooldown=40)
        first.cancel(held["key-3"])
        held = both()
        first.release(held["key-1"], latency=1.0)
        first.cancel(held["key-3"])
        held = both()
        first.mark_failed(held["key-1"])
        first.cancel(held["key-3"])
    finally:
        first.close()
    before = {e["name"]: e for e in first_status(path)}
    second = keymesh.SyncKeyPool(KEYS, storage=SyncJSONStorage(path), max_failures=3)
    try:
        after = {e["name"]: e for e in second.status()["keys"]}
        assert after["key-1"]["success_count"] == before["key-1"]["success_count"] == 2
        assert after["key-1"]["failure_count"] == 1 and after["key-1"]["fail_streak"] == 0
        assert after["key-1"]["latency_avg"] == pytest.approx(0.6)
        assert 30 < after["key-2"]["cooldown_remaining"] <= 40 and not after["key-2"]["is_available"]
        assert after["key-2"]["rate_limited"] == 1
        assert after["key-3"]["success_count"] == 0 and after["key-3"]["is_available"]
    finally:
        second.close()


def first_status(path: Any) -> List[Dict[str, Any]]:
    return list(read_json(path).values())


def test_restore_reads_the_originals_file(tmp_path, caplog):
    """A file the original wrote (no saved_at: its cooldown_until is another
    process's monotonic clock) restores counters and latency, not cooldowns;
    hostile values are an error for their entry only."""
    good = {"key_suffix": "...op0000", "active_requests": 0, "cooldown_until": 1e12, "cooldown_remaining": 55.0,
            "success_count": 12, "failure_count": 30, "latency_avg": 0.75, "last_used": 5.0, "is_available": True,
            "health_score": 0.2}
    hostile = [
        dict(good, success_count=-1),
        dict(good, failure_count="many"),
        dict(good, latency_avg=float("nan")),
        dict(good, latency_avg=1e300),
        dict(good, success_count=2 ** 64),
        dict(good, has_latency="yes"),
    ]
    keys = [secret(i) for i in range(1 + len(hostile))]
    entries = {storage_id(keys[0]): good}
    entries.update({storage_id(k): h for k, h in zip(keys[1:], hostile)})
    path = tmp_path / "original.json"
    path.write_text(json.dumps(entries, indent=2), encoding="utf-8")
    with caplog.at_level(logging.ERROR, logger="keymesh"):
        pool = keymesh.SyncKeyPool(keys, storage=SyncJSONStorage(path), max_failures=10)
    try:
        st = {e["name"]: e for e in pool.status()["keys"]}
        assert st["key-1"]["success_count"] == 12 and st["key-1"]["failure_count"] == 30
        assert st["key-1"]["latency_avg"] == pytest.approx(0.75)
        assert st["key-1"]["is_available"] and st["key-1"]["cooldown_remaining"] == 0  # counts, not a streak
        for i in range(2, 2 + len(hostile)):
            assert st[f"key-{i}"]["success_count"] == 0 and st[f"key-{i}"]["latency_avg"] == 0
        errors = [r.getMessage() for r in caplog.records if "not restored" in r.getMessage()]
        assert len(errors) == len(hostile)
        for field in ("success_count", "failure_count", "latency_avg", "has_latency"):
            assert any(field in m for m in errors)
        assert not any(k in m for k in keys for m in errors)
    finally:
        pool.close()


def test_restored_cooldown_counts_from_the_saved_wall_clock(tmp_path):
    entry = {"success_count": 1, "failure_count": 0, "latency_avg": 0.0, "cooldown_remaining": 100.0,
             "saved_at": time.time() - 60}
    far = dict(entry, cooldown_remaining=1e9 - 1, saved_at=time.time())  # capped by the pool
    storage = SyncMemoryStorage()
    storage.save(KEYS[0], entry)
    storage.save(KEYS[1], far)
    pool = keymesh.SyncKeyPool(KEYS, storage=storage, default_cooldown=60)
    try:
        st = {e["name"]: e for e in pool.status()["keys"]}
        assert 35 < st["key-1"]["cooldown_remaining"] <= 40
        assert 590 < st["key-2"]["cooldown_remaining"] <= 600  # max(max_cooldown 600, default 60)
        assert st["key-1"]["latency_avg"] == 0 and not st["key-1"]["has_latency"]
    finally:
        pool.close()


def test_restore_from_a_corrupt_file_starts_fresh_and_keeps_it(tmp_path, caplog):
    path = tmp_path / "state.json"
    path.write_bytes(b"not json at all")
    with caplog.at_level(logging.ERROR, logger="keymesh"):
        pool = keymesh.SyncKeyPool(KEYS, storage=SyncJSONStorage(path))
    try:
        assert any("corrupt" in r.getMessage() for r in caplog.records)
        k = pool.acquire()
        pool.release(k, latency=0.1)
        flush(pool)
        assert set(read_json(path)) == {storage_id(str(k))}
        aside = glob.glob(str(path) + ".corrupt-*")
        assert len(aside) == 1 and open(aside[0], "rb").read() == b"not json at all"
    finally:
        pool.close()


def test_attached_pool_is_not_restored(make_pool, mode):
    if mode != "attached":
        pytest.skip("attached pools only")
    storage = Recording({storage_id(KEYS[0]): {"success_count": 99, "failure_count": 0, "latency_avg": 0.0}})
    pool = make_pool(KEYS, storage=storage)
    assert storage.loads == 0  # the broker's state file is the authority
    assert all(e["success_count"] == 0 for e in pool.status()["keys"])
    k = pool.acquire()
    pool.release(k)
    flush(pool)
    assert [key for key, _ in storage.saves] == [str(k)]


def test_a_forked_child_gets_its_own_writer(make_pool):
    storage = SyncMemoryStorage()
    pool = make_pool(KEYS, storage=storage)
    k = pool.acquire()
    pool.release(k)
    flush(pool)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            k2 = pool.acquire(timeout=5)
            pool.release(k2, latency=0.3)
            flush(pool)  # the child's own writer thread saved it, into the child's copy
            entry = storage.load(str(k2))
            os.write(w, json.dumps(entry).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        entry = json.loads(f.read() or b"null")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert entry is not None and entry["success_count"] >= 1


# ---- asyncio -------------------------------------------------------------------

def run_debug(coro: Any) -> Any:
    """Runs ``coro`` with the loop's debug mode on; any callback that blocks
    the loop for 50 ms or more (a blocking call in the loop) fails the test."""
    slow: List[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "Executing" in record.getMessage() and "took" in record.getMessage():
                slow.append(record.getMessage())

    async def main() -> Any:
        asyncio.get_running_loop().slow_callback_duration = 0.05
        return await coro

    handler = Catch()
    logging.getLogger("asyncio").addHandler(handler)
    try:
        result = asyncio.run(main(), debug=True)
    finally:
        logging.getLogger("asyncio").removeHandler(handler)
    assert not slow, slow
    return result


class AsyncRecording(BaseStorage):
    """A user's async storage: its coroutines must run on the writer's loop."""

    def __init__(self) -> None:
        self.saves: List[tuple] = []
        self.loops: set = set()

    async def save(self, key: str, state: Dict[str, Any]) -> None:
        self.loops.add(id(asyncio.get_running_loop()))
        await asyncio.sleep(0)
        self.saves.append((key, state))

    async def load(self, key: str) -> Optional[Dict[str, Any]]:
        return None

    async def load_all(self) -> Dict[str, Dict[str, Any]]:
        self.loops.add(id(asyncio.get_running_loop()))
        return {}

    async def delete(self, key: str) -> None:
        pass


def test_async_pool_with_async_storages(make_pool, tmp_path):
    path = tmp_path / "async.json"
    user = AsyncRecording()

    # Built before the loop runs, as a server builds its pool at start-up: a
    # constructor is a blocking call (it restores from the storage, or meets
    # the broker), the coroutines below never are.
    pool = make_pool(KEYS, cls=keymesh.KeyPool, storage=JSONStorage(path))
    upool = make_pool(KEYS, cls=keymesh.KeyPool, storage=user)

    async def main():
        loop_id = id(asyncio.get_running_loop())
        for p in (pool, upool):
            for _ in range(20):
                k = await p.acquire()
                await p.release(k, latency=0.02)
            k = await p.acquire()
            await p.mark_rate_limited(k, cooldown=10)
        await pool.close()  # flushes
        await upool.close()
        assert loop_id not in user.loops  # never on the caller's loop
        return k

    run_debug(main())
    data = read_json(path)
    assert sum(e["success_count"] for e in data.values()) == 20
    assert sum(1 for e in data.values() if e["cooldown_remaining"] > 0) == 1
    assert sum(1 for _ in user.saves) >= 1 and all(type(k) is str for k, _ in user.saves)
