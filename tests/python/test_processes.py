"""Cross-process behaviour: pools created before fork, shared state, dead holders."""
from __future__ import annotations

import os
import signal
import time

import pytest

import keymesh
from conftest import fork, secret, wait_ok

KEYS = [secret(i) for i in range(4)]


def test_rate_limit_in_one_process_seen_by_another_at_once(make_pool):
    pool = make_pool(KEYS, strategy="round_robin")
    r, w = os.pipe()

    def child():
        key = pool.acquire()
        pool.mark_rate_limited(key, cooldown=60)
        os.write(w, key.name.encode())

    pid = fork(child)
    name = os.read(r, 64).decode()
    wait_ok(pid)
    os.close(r)
    os.close(w)
    # No waiting: the 429 is already in the shared state.
    assert pool.available_count() == 3
    entry = next(k for k in pool.status()["keys"] if k["name"] == name)
    assert entry["is_available"] is False and entry["rate_limited_count"] == 1
    for _ in range(9):
        key = pool.acquire(timeout=0)
        assert key.name != name
        pool.release(key)


def test_pool_created_before_fork_used_by_8_children(make_pool):
    pool = make_pool(KEYS, max_failures=1000)
    n_children, per_child = 8, 50

    def child():
        for i in range(per_child):
            key = pool.acquire(timeout=5)
            if i % 10 == 9:
                pool.mark_failed(key)
            else:
                pool.release(key, latency=0.001)
        assert pool.held_count() == 0

    held_before = pool.acquire()  # the parent's own lease stays the parent's
    pids = [fork(child) for _ in range(n_children)]
    for pid in pids:
        wait_ok(pid)
    pool.release(held_before, latency=0.001)
    m = pool.status()["pool_metrics"]
    total = n_children * per_child
    assert m["total_acquires"] == total + 1
    assert m["total_failures"] == n_children * (per_child // 10)
    assert m["total_releases"] == total + 1 - m["total_failures"]
    assert all(k["active_requests"] == 0 for k in pool.status()["keys"])


def test_child_starts_holding_nothing(make_pool):
    pool = make_pool(KEYS)
    key = pool.acquire()

    def child():
        assert pool.held_count() == 0
        with pytest.raises(keymesh.KeyNotHeldError):
            pool.release(key)  # the parent's lease is not the child's to end
        mine = pool.acquire()
        pool.release(mine, latency=0.01)

    wait_ok(fork(child))
    assert pool.held_count() == 1
    pool.release(key, latency=0.01)
    assert pool.status()["pool_metrics"]["total_releases"] == 2


def test_sigkill_of_holder_frees_its_key(make_pool):
    pool = make_pool(KEYS[:1])
    r, w = os.pipe()

    def child():
        pool.acquire()
        os.write(w, b"x")
        signal.pause()

    pid = fork(child)
    assert os.read(r, 1) == b"x"
    os.close(r)
    os.close(w)
    assert pool.status()["keys"][0]["active_requests"] == 1
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    if make_pool.mode == "embedded":
        # No broker: the master frees dead holders' leases (keymesh.gunicorn.child_exit).
        assert keymesh.reclaim_worker(pid) == 1
    deadline = time.monotonic() + 2  # the broker reaps by itself (target 100 ms)
    while pool.status()["keys"][0]["active_requests"] != 0:
        assert time.monotonic() < deadline, "dead holder's lease not reclaimed"
        time.sleep(0.005)
    entry = pool.status()["keys"][0]
    assert entry["reclaimed_count"] == 1
    pool.release(pool.acquire(timeout=1), latency=0.01)


def test_gunicorn_hooks(make_pool):
    from keymesh import gunicorn as hooks

    pool = make_pool(KEYS[:1])

    class Worker:
        pid = 0

    def child():
        hooks.post_fork(None, Worker())
        pool.acquire()
        os._exit(0)  # dies holding the key

    Worker.pid = fork(child)
    os.waitpid(Worker.pid, 0)
    hooks.child_exit(None, Worker())
    if make_pool.mode == "embedded":
        assert pool.status()["keys"][0]["active_requests"] == 0
    deadline = time.monotonic() + 2
    while pool.status()["keys"][0]["active_requests"] != 0:
        assert time.monotonic() < deadline, "dead worker's lease not reclaimed"
        time.sleep(0.005)
