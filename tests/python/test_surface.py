"""The rest of the original package's public surface: KeyState/SyncKeyState,
CooldownManager, SemaphoreGroup, PoolMetrics and keymesh.utils.helpers, used
the way the original's docs use them, with its defects fixed."""
from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

import keymesh
from conftest import CpuWaits, DebugLoopPolicy, SlowCallbacks, _run_delay_s, secret
from keymesh.concurrency import SemaphoreGroup
from keymesh.cooldown import CooldownManager
from keymesh.metrics import PoolMetrics
from keymesh.state import KeyState, SyncKeyState
from keymesh.utils.helpers import mask_key, now, retry_on, setup_logging

PACKAGE = str(Path(__file__).resolve().parents[2] / "client" / "python")
KEY = secret(1)


def python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=PACKAGE)  # and this run's KEYMESH_LIB
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)


# ---- names and places ------------------------------------------------------
def test_original_names_import_from_their_places():
    from keymesh.concurrency.semaphores import SemaphoreGroup as S
    from keymesh.cooldown.manager import CooldownManager as C
    from keymesh.metrics.pool_metrics import PoolMetrics as P
    from keymesh.state.key_state import KeyState as K
    from keymesh.state.sync_key_state import SyncKeyState as SK
    from keymesh.utils import helpers
    assert (S, C, P, K, SK) == (SemaphoreGroup, CooldownManager, PoolMetrics, KeyState, SyncKeyState)
    assert keymesh.KeyState is KeyState and keymesh.SyncKeyState is SyncKeyState
    assert keymesh.mask_key is helpers.mask_key and keymesh.retry_on is helpers.retry_on
    for name in ("setup_logging", "now", "mask_key", "retry_on"):
        assert callable(getattr(helpers, name))
    for name in ("KeyState", "SyncKeyState", "CooldownManager", "SemaphoreGroup", "PoolMetrics", "setup_logging",
                 "now", "retry_on", "mask_key"):
        assert name in keymesh.__all__
    assert {"OpenAIHandler", "AsyncOpenAIHandler"} <= set(dir(keymesh))


def test_import_keymesh_does_not_import_httpx():
    r = python("import sys, keymesh; from keymesh.integrations import openai_handler as m0\n"
               "assert 'httpx' in sys.modules")
    assert r.returncode == 0, r.stderr
    r = python("import sys, keymesh, keymesh.integrations\n"
               "assert 'httpx' not in sys.modules, 'imported httpx'\n"
               "h = keymesh.OpenAIHandler\n"
               "assert 'httpx' in sys.modules and h.__module__ == 'keymesh.integrations.openai_handler'")
    assert r.returncode == 0, r.stderr


def test_missing_httpx_is_a_clear_import_error():
    r = python("import sys; sys.modules['httpx'] = None\nimport keymesh\nfrom keymesh import *\n"
               "try:\n    keymesh.OpenAIHandler\nexcept ImportError as e:\n    print(e)\n")
    assert r.returncode == 0, r.stderr
    assert "need httpx" in r.stdout


# ---- SyncKeyState ----------------------------------------------------------
def test_sync_key_state_fields_and_derived_values():
    s = SyncKeyState(KEY)
    assert (s.key, s.max_failures, s.active_requests, s.cooldown_until, s.success_count, s.failure_count,
            s.latency_avg, s.last_used) == (KEY, 10, 0, 0.0, 0, 0, 0.0, 0.0)
    assert s.is_available and not s.is_cooling_down and not s.is_exhausted
    assert s.health_score == 1.0 and s.cooldown_remaining == 0.0
    before = time.monotonic()
    s.increment_active()
    assert s.active_requests == 1 and s.last_used >= before
    s.record_success(0.5)
    s.record_success(1.0)  # the original's example: 0.5 then 1.0 -> 0.6
    assert s.latency_avg == pytest.approx(0.6) and s.success_count == 2 and s.active_requests == 0
    assert s.health_score == pytest.approx(1 / 1.6)
    s.record_failure()
    assert s.health_score == pytest.approx((2 / 3) / 1.6)
    s.decrement_active()
    assert s.active_requests == 0  # clamps at 0


def test_latency_ema_is_seeded_by_sample_count_not_by_zero():
    s = SyncKeyState(KEY)
    s.record_success(0.0)   # a real sample of 0 s
    s.record_success(1.0)
    assert s.latency_avg == pytest.approx(0.2) and s.latency_samples == 2
    s.record_success()      # no latency: no sample, the average is unchanged
    assert s.latency_avg == pytest.approx(0.2) and s.latency_samples == 2 and s.success_count == 3


def test_failure_count_limit_is_a_streak_that_a_success_ends():
    s = SyncKeyState(KEY, max_failures=3)
    for _ in range(2):
        s.record_failure()
    s.record_success(0.1)
    for _ in range(2):
        s.record_failure()
    assert not s.is_exhausted and s.failure_count == 4 and s.consecutive_failures == 2
    s.record_failure()
    assert s.is_exhausted and not s.is_available and s.health_score == 0.0
    s.reset_failures()
    assert s.is_available and s.failure_count == 5


def test_a_cooldown_keeps_the_failure_history():
    s = SyncKeyState(KEY, max_failures=2)
    s.record_failure()
    s.record_failure()
    s.increment_active()
    s.apply_cooldown(0.0)   # a 429 on an exhausted key does not re-admit it
    assert s.is_exhausted and s.consecutive_failures == 2 and s.active_requests == 0
    s.reset_failures()
    s.apply_cooldown(30.0)
    assert s.is_cooling_down and not s.is_available and 29.0 < s.cooldown_remaining <= 30.0
    s.apply_cooldown(0.5)   # a new cooldown replaces the old one
    assert s.cooldown_remaining <= 0.5


def test_snapshot_has_the_original_fields_in_order_and_is_masked():
    s = SyncKeyState(KEY)
    s.record_success(0.123456)
    snap = s.snapshot()
    assert list(snap)[:10] == ["key_suffix", "active_requests", "cooldown_until", "cooldown_remaining",
                               "success_count", "failure_count", "latency_avg", "last_used", "is_available",
                               "health_score"]
    assert snap["key_suffix"] == "..." + KEY[-4:] and snap["latency_avg"] == 0.1235
    assert snap["health_score"] == round(1 / 1.123456, 4) and snap["is_available"] is True
    assert KEY not in repr(s) and KEY[-4:] in repr(s)
    short = SyncKeyState("sk-123")   # the original printed keys of <= 6 chars in full
    assert short.snapshot()["key_suffix"] == "***" and "sk-123" not in repr(short)


@pytest.mark.parametrize("bad", [dict(key=""), dict(key=3), dict(key="k", max_failures=0),
                                 dict(key="k", max_failures=True), dict(key="k", max_failures=2.5)])
def test_key_state_rejects_bad_construction(bad):
    with pytest.raises(keymesh.ConfigError):
        SyncKeyState(**bad)


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), "1", True])
def test_key_state_rejects_bad_durations(value):
    s = SyncKeyState(KEY)
    with pytest.raises(keymesh.ConfigError):
        s.apply_cooldown(value)
    with pytest.raises(keymesh.ConfigError):
        s.record_success(value)
    assert s.success_count == 0 and s.cooldown_until == 0.0


def test_sync_key_state_across_threads_counts_exactly():
    s = SyncKeyState(KEY, max_failures=10**9)
    n, per = 8, 2000
    start = threading.Barrier(n)

    def work(i):
        start.wait()
        for _ in range(per):
            s.increment_active()
            if i % 2:
                s.record_success(0.01)
            else:
                s.record_failure()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert s.success_count == n // 2 * per and s.failure_count == n // 2 * per
    assert s.active_requests == 0 and s.latency_samples == n // 2 * per


# ---- KeyState (asyncio) ----------------------------------------------------
def test_key_state_async_mutators(asyncio_debug):
    async def main():
        s = KeyState(KEY, max_failures=2)
        await s.increment_active()
        await s.record_success(0.5)
        await s.record_failure()
        await s.record_failure()
        assert s.is_exhausted
        await s.apply_cooldown(10.0)
        assert s.is_exhausted and s.is_cooling_down
        await s.reset_failures()
        await s.decrement_active()
        return s

    s = asyncio.run(main())
    assert (s.success_count, s.failure_count, s.active_requests) == (1, 2, 0)
    assert not s.is_exhausted and s.cooldown_remaining > 9.0 and not s.is_available
    assert KEY not in repr(s)


@pytest.mark.slow_callback(0.5)  # four loops' threads take turns at the GIL
def test_key_state_shared_by_tasks_of_several_threads_loops(asyncio_debug):
    s = KeyState(KEY, max_failures=10**9)
    n, tasks, per = 4, 10, 100

    async def worker():
        for _ in range(per):
            await s.increment_active()
            await asyncio.sleep(0)
            await s.record_success(0.02)

    async def loop_main():
        await asyncio.gather(*(worker() for _ in range(tasks)))

    threads = [threading.Thread(target=asyncio.run, args=(loop_main(),)) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert s.success_count == n * tasks * per and s.active_requests == 0
    assert s.latency_avg == pytest.approx(0.02)


# ---- CooldownManager ---------------------------------------------------------
def test_cooldown_manager_on_a_key_state():
    s = SyncKeyState(KEY)
    assert CooldownManager.is_expired(s) and CooldownManager.remaining(s) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # locked on a KeyMesh state: no warning
        CooldownManager.apply(s, duration=5.0)
    assert not CooldownManager.is_expired(s) and 4.0 < CooldownManager.remaining(s) <= 5.0
    assert not s.is_available
    CooldownManager.apply(s, 0.0)
    assert CooldownManager.is_expired(s)
    with pytest.raises(keymesh.ConfigError):
        CooldownManager.apply(s, -1.0)


def test_cooldown_manager_on_a_foreign_object_warns_as_the_original():
    class Foreign:
        cooldown_until = 0.0

    f = Foreign()
    with pytest.warns(DeprecationWarning, match=r"^CooldownManager.apply\(\) is not concurrency-safe\."):
        CooldownManager.apply(f)
    assert 59.0 < CooldownManager.remaining(f) <= 60.0


# ---- SemaphoreGroup ----------------------------------------------------------
def test_semaphore_group_caps_concurrency_per_key(asyncio_debug):
    group = SemaphoreGroup(max_concurrent=3)
    active = {"a": 0, "b": 0}
    peak = {"a": 0, "b": 0}

    async def use(key):
        async with group.acquire(key):
            active[key] += 1
            peak[key] = max(peak[key], active[key])
            await asyncio.sleep(0.001)
            active[key] -= 1

    async def main():
        assert group.acquire("a") is group.acquire("a")
        assert group.acquire("a") is not group.acquire("b")
        await asyncio.gather(*(use(k) for k in "ab" * 20))

    asyncio.run(main())
    assert peak == {"a": 3, "b": 3}


@pytest.mark.slow_callback(0.5)  # four loops' threads take turns at the GIL
def test_semaphore_group_is_per_loop_thread_safe_and_bounded(asyncio_debug):
    group = SemaphoreGroup(max_concurrent=1)
    seen = []
    lock = threading.Lock()

    async def main():
        sems = [group.acquire(f"k{i}") for i in range(50)]
        async with sems[0]:
            await asyncio.sleep(0)
        with lock:
            seen.append(sems)

    threads = [threading.Thread(target=asyncio.run, args=(main(),)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 4
    assert len({id(s[0]) for s in seen}) == 4      # one semaphore per loop: never shared across loops
    assert len(group) <= 4 * 50
    for i in range(50):
        group.discard(f"k{i}")
    assert len(group) == 0
    with pytest.raises(keymesh.ConfigError):
        SemaphoreGroup(0)


# ---- PoolMetrics ---------------------------------------------------------------
def test_pool_metrics_snapshot_shape_and_locked_counters():
    m = PoolMetrics()
    n, per = 8, 1000

    def work():
        for _ in range(per):
            m.record_acquire()
            m.record_release()
            m.record_failure()
            m.record_cooldown()
            m.record_retry()
            m.record_no_key()

    threads = [threading.Thread(target=work) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = m.snapshot()
    assert list(snap) == ["uptime_seconds", "total_acquires", "total_releases", "total_failures",
                          "total_cooldowns", "total_retries", "no_key_available_count"]
    assert all(snap[k] == n * per for k in list(snap)[1:])
    assert snap["uptime_seconds"] == round(snap["uptime_seconds"], 2) and m.uptime_seconds >= 0.0


# ---- helpers ---------------------------------------------------------------------
def test_mask_key():
    assert mask_key("sk-abcdefghijklmnop") == "...mnop"
    assert mask_key("sk-abcdefghijklmnop", visible_chars=6) == "...klmnop"
    assert mask_key("sk-abcdef", visible_chars=6) == "***"   # never most of a short key
    assert mask_key("abcdefghijk") == "***" and mask_key("abcdefghijkl") == "...ijkl"
    assert mask_key("") == "***" and mask_key("sk-abcdefghijklmnop", visible_chars=0) == "***"
    with pytest.raises(keymesh.ConfigError):
        mask_key("sk-abcdefghijklmnop", visible_chars=-1)


def test_now_is_the_monotonic_clock():
    a = now()
    b = time.monotonic()
    c = now()
    assert a <= b <= c


def test_setup_logging_configures_root_with_iso_timestamps():
    r = python("import logging\nfrom keymesh.utils.helpers import setup_logging\n"
               "setup_logging('DEBUG')\nlogging.getLogger('keymesh').debug('hello')")
    assert r.returncode == 0, r.stderr
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d DEBUG +keymesh: hello$", r.stderr.strip()), r.stderr
    with pytest.raises(keymesh.ConfigError):
        setup_logging("LOUD")


def test_retry_on_retries_the_listed_exceptions_then_reraises():
    calls = []

    @retry_on(ConnectionError, TimeoutError, max_retries=3, delay=0.0)
    def flaky(succeed_at):
        calls.append(1)
        if len(calls) < succeed_at:
            raise ConnectionError(f"attempt {len(calls)}")
        return len(calls)

    assert flaky(3) == 3
    calls.clear()
    with pytest.raises(ConnectionError, match="attempt 3"):
        flaky(10)
    assert len(calls) == 3
    assert flaky.__name__ == "flaky"

    @retry_on(ConnectionError, delay=0.0)
    def other():
        calls.append(1)
        raise KeyError("not retried")

    calls.clear()
    with pytest.raises(KeyError):
        other()
    assert len(calls) == 1


def test_retry_on_waits_delay_between_attempts():
    stamps = []

    @retry_on(ValueError, max_retries=2, delay=0.05)
    def f():
        stamps.append(time.monotonic())
        raise ValueError

    with pytest.raises(ValueError):
        f()
    assert len(stamps) == 2 and stamps[1] - stamps[0] >= 0.05


def test_retry_on_async_functions_do_not_block_the_loop(asyncio_debug):
    calls = []

    @retry_on(OSError, max_retries=4, delay=0.06)  # a blocking sleep would be flagged
    async def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("again")
        return "ok"

    assert asyncio.run(flaky()) == "ok" and len(calls) == 3


@pytest.mark.parametrize("kw", [dict(max_retries=0), dict(delay=-1), dict(delay=float("nan"))])
def test_retry_on_rejects_bad_arguments(kw):
    with pytest.raises(keymesh.ConfigError):
        retry_on(ValueError, **kw)
    with pytest.raises(keymesh.ConfigError):
        retry_on("ValueError")  # type: ignore[arg-type]


# ---- the debug-mode gate itself ------------------------------------------------
def test_asyncio_debug_flags_a_blocking_call():
    old = asyncio.get_event_loop_policy()
    handler = SlowCallbacks()
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    asyncio.set_event_loop_policy(DebugLoopPolicy())
    try:
        async def blocks():
            time.sleep(0.2)

        asyncio.run(blocks())
    finally:
        asyncio.set_event_loop_policy(old)
        logger.removeHandler(handler)
    assert handler.slow and "took" in handler.slow[0]


def test_asyncio_debug_still_flags_a_sleep_when_it_spares_cpu_waits():
    old = asyncio.get_event_loop_policy()
    logger = logging.getLogger("asyncio")
    with CpuWaits() as waits:
        handler = SlowCallbacks(waits)
        logger.addHandler(handler)
        asyncio.set_event_loop_policy(DebugLoopPolicy())
        try:
            async def blocks():
                time.sleep(0.2)  # blocked, not waiting for a CPU

            asyncio.run(blocks())
        finally:
            asyncio.set_event_loop_policy(old)
            logger.removeHandler(handler)
    assert handler.slow and "took" in handler.slow[0] and "waiting for a CPU" in handler.slow[0]


def test_cpu_waits_spare_run_queue_delay_and_collections():
    w = CpuWaits()  # not started: samples by hand
    w.samples[7].extend([(10.0, 1.0), (10.1, 1.02), (10.2, 1.30)])
    # A step over [10.15, 10.3] on thread 7, which had waited 1.35 s in all at
    # its end: from the sample before its start (1.02), 0.33 s for a CPU.
    assert abs(w.discount(7, 10.15, 10.3, 1.35) - 0.33) < 1e-9
    assert w.discount(8, 10.15, 10.3, 1.35) == 0.0  # an unsampled thread: nothing spared
    assert w.discount(7, 9.0, 10.3, 1.35) == 0.0  # no sample before the start: nothing spared
    w.collections.extend([(10.25, 10.28), (10.29, 10.5)])
    assert abs(w.discount(8, 10.15, 10.3, None) - 0.04) < 1e-9  # the collections within the step
    # The handler judges a logged step by what it spares: this thread "waited
    # for a CPU" 0.1 s since a sample a second ago.
    delay = _run_delay_s()
    if delay is None:
        pytest.skip("no /proc/thread-self/schedstat here")
    w.samples[threading.get_native_id()].append((time.monotonic() - 1, delay - 0.1))
    handler = SlowCallbacks(w, bound=0.08)

    def log(took):
        handler.emit(logging.LogRecord("asyncio", logging.WARNING, __file__, 1,
                                       f"Executing <Task x> took {took} seconds", None, None))

    log(0.132)
    assert handler.slow == []  # 0.03 s of it ran or blocked
    log(0.3)
    assert len(handler.slow) == 1 and "waiting for a CPU" in handler.slow[0]


# ---- burst and rate_margin, per key and per pool -------------------------------
def keys_by_name(pool):
    return {k["name"]: k for k in pool.status()["keys"]}


def test_pool_wide_burst_and_rate_margin_embedded():
    pool = keymesh.SyncKeyPool([("a", secret(1)), {"name": "b", "secret": secret(2), "burst": 5, "rate_margin": 0.1}],
                               burst=3, rate_margin=0.05)
    try:
        pool.add_key(secret(3), name="c")
        pool.add_key(secret(4), name="d", burst=7, rate_margin=0.2)
        k = keys_by_name(pool)
        assert [(k[n]["burst"], k[n]["rate_margin"]) for n in "abcd"] == [(3, -1.0), (5, 0.1), (3, -1.0), (7, 0.2)]
        assert pool.status()["options"]["rate_margin"] == 0.05
    finally:
        pool.close()


def test_pool_wide_burst_grants_back_to_back():
    pool = keymesh.SyncKeyPool([{"secret": secret(1), "rpm": 6}], burst=3)
    try:
        for _ in range(3):  # the burst: granted at once
            pool.release(pool.acquire(timeout=0))
        with pytest.raises(keymesh.NoAvailableKeyError):  # then paced at 6/min
            pool.acquire(timeout=0)
    finally:
        pool.close()
    smooth = keymesh.SyncKeyPool([{"secret": secret(1), "rpm": 6}])
    try:
        smooth.release(smooth.acquire(timeout=0))
        with pytest.raises(keymesh.NoAvailableKeyError):
            smooth.acquire(timeout=0)
    finally:
        smooth.close()


@pytest.mark.parametrize("kw", [dict(burst=-1), dict(burst=1_000_001), dict(burst=True), dict(burst=2.5),
                                dict(rate_margin=0.5), dict(rate_margin=-0.1), dict(rate_margin=float("nan"))])
def test_pool_burst_and_rate_margin_are_range_checked(kw):
    with pytest.raises(keymesh.ConfigError):
        keymesh.SyncKeyPool([secret(1)], **kw)


def test_per_key_burst_and_rate_margin_through_add_key(make_pool):
    pool = make_pool([secret(1)])
    pool.add_key(secret(2), name="tuned", burst=4, rate_margin=0.3)
    k = keys_by_name(pool)["tuned"]
    assert (k["burst"], k["rate_margin"]) == (4, 0.3)
    with pytest.raises(keymesh.ConfigError):
        pool.add_key(secret(3), name="bad", burst=2_000_000)
    with pytest.raises(keymesh.ConfigError):
        pool.add_key(secret(3), name="bad", rate_margin=0.9)
    assert "bad" not in keys_by_name(pool)
