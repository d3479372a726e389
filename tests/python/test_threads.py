"""One pool object used from many threads; blocking waits release the GIL."""
from __future__ import annotations

import threading
import time

import keymesh
from conftest import secret

KEYS = [secret(i) for i in range(4)]


def test_16_threads_exact_counters(make_pool):
    pool = make_pool(KEYS, max_failures=10_000)
    n_threads, per_thread = 16, 200
    start = threading.Barrier(n_threads)
    errors = []

    def work(t):
        try:
            start.wait()
            for i in range(per_thread):
                key = pool.acquire(timeout=5)
                if (t + i) % 20 == 0:
                    pool.mark_failed(key)
                elif (t + i) % 20 == 1:
                    pool.mark_rate_limited(key, cooldown=0)
                else:
                    pool.release(key, latency=0.001)
                if i % 50 == 0:
                    pool.status()
                    pool.available_count()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    m = pool.status()["pool_metrics"]
    total = n_threads * per_thread
    assert m["total_acquires"] == total
    assert m["total_failures"] == total // 20
    assert m["total_rate_limited"] == total // 20
    assert m["total_releases"] == total - 2 * (total // 20)
    assert pool.held_count() == 0
    assert all(k["active_requests"] == 0 for k in pool.status()["keys"])


def test_blocking_wait_releases_the_gil(make_pool):
    pool = make_pool(KEYS[:1])
    pool.mark_rate_limited(pool.acquire(), cooldown=60)
    started = threading.Event()
    result = []

    def blocked():
        started.set()
        try:
            pool.acquire(timeout=0.3)
        except keymesh.NoAvailableKeyError as e:
            result.append(e)

    t = threading.Thread(target=blocked)
    t.start()
    started.wait()
    spins = 0
    t0 = time.monotonic()
    while t.is_alive():
        spins += 1  # this thread keeps running Python while the other waits in C
    waited = time.monotonic() - t0
    t.join()
    assert result and waited >= 0.2
    assert spins > 10_000


def test_close_wakes_blocked_threads(make_pool):
    pool = make_pool(KEYS[:1])
    pool.mark_rate_limited(pool.acquire(), cooldown=60)
    outcome = []
    started = threading.Event()

    def blocked():
        started.set()
        try:
            pool.acquire(timeout=30)
        except keymesh.KeyMeshError as e:
            outcome.append(e)

    threads = [threading.Thread(target=blocked) for _ in range(4)]
    for t in threads:
        t.start()
    started.wait()
    t0 = time.monotonic()
    pool.close()
    for t in threads:
        t.join(5)
    assert time.monotonic() - t0 < 2
    assert len(outcome) == 4 and all(isinstance(e, keymesh.PoolClosedError) for e in outcome)
