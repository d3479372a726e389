"""Custom schedulers: a BaseScheduler's own select chooses the key, outside the
pool's lock, in embedded and attached pools, across processes, sync and asyncio."""
from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from typing import Any, List, Optional, Sequence

import pytest

import keymesh
from conftest import fork, secret, wait_ok
from keymesh.scheduler import (BaseScheduler, KeyView, LeastBusyScheduler, RoundRobinScheduler, SchedulerStrategy,
                               WeightedScheduler, build_scheduler)
from keymesh.scheduler import _choose

KEYS = [secret(i) for i in range(3)]


class ByName(BaseScheduler):
    """Always the key called ``name`` when it is a candidate, else None."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: List[List[str]] = []

    def select(self, candidates: Sequence[KeyView]) -> Optional[KeyView]:
        self.calls.append([c.name for c in candidates])
        for c in candidates:
            if c.name == self.name:
                return c
        return None


def held_by_name(pool: Any) -> dict:
    return {k["name"]: k["active_requests"] for k in pool.status()["keys"]}


# ---- the choice, across processes ---------------------------------------------

def test_a_forked_childs_choice_is_the_key_the_parent_sees_held(make_pool):
    scheduler = ByName("key-2")
    pool = make_pool(KEYS, scheduler=scheduler, strategy="round_robin")
    assert "acquire" in vars(pool)  # this pool's own path, chosen at construction
    acquired_r, acquired_w = os.pipe()
    done_r, done_w = os.pipe()

    def child():
        key = pool.acquire(timeout=5)
        os.write(acquired_w, key.name.encode() + b"\n")
        os.read(done_r, 1)  # hold it until the parent looked
        pool.release(key)

    pid = fork(child)
    try:
        line = b""
        while not line.endswith(b"\n"):
            chunk = os.read(acquired_r, 64)
            assert chunk, "the child died before acquiring"
            line += chunk
        assert line.strip() == b"key-2"
        # The parent sees exactly that key held (by the child, not by itself).
        assert held_by_name(pool) == {"key-1": 0, "key-2": 1, "key-3": 0}
        assert pool.held_count() == 0
    finally:
        os.write(done_w, b"x")
        wait_ok(pid)
    assert held_by_name(pool)["key-2"] == 0
    # The parent's own acquire goes through the scheduler too: round robin would start at key-1.
    key = pool.acquire(timeout=5)
    assert key.name == "key-2" and held_by_name(pool)["key-2"] == 1
    pool.release(key)
    for f in (acquired_r, acquired_w, done_r, done_w):
        os.close(f)


def test_lease_goes_through_the_scheduler(make_pool):
    pool = make_pool(KEYS, scheduler=ByName("key-3"))
    with pool.lease(timeout=5) as key:
        assert key.name == "key-3"
        assert held_by_name(pool)["key-3"] == 1
    assert held_by_name(pool)["key-3"] == 0
    assert pool.status()["keys"][2]["success_count"] == 1


# ---- retry and fallback ----------------------------------------------------------

class TakenAway(BaseScheduler):
    """Chooses the first candidate and, before the pool can acquire it, makes it
    ineligible (as another process taking its last slot would): disables it,
    and re-enables the one it disabled before."""

    def __init__(self, pool_ref: List[Any], times: int) -> None:
        self.pool_ref = pool_ref
        self.times = times
        self.disabled: Optional[str] = None
        self.calls: List[List[str]] = []

    def select(self, candidates: Sequence[KeyView]) -> Optional[KeyView]:
        self.calls.append([c.name for c in candidates])
        choice = candidates[0]
        if self.times > 0:
            self.times -= 1
            pool = self.pool_ref[0]
            pool.disable_key(choice.name)
            if self.disabled is not None:
                pool.enable_key(self.disabled)
            self.disabled = choice.name
        return choice


def test_a_key_taken_between_snapshot_and_acquire_is_retried_with_a_fresh_snapshot(make_pool):
    ref: List[Any] = []
    scheduler = TakenAway(ref, times=1)
    pool = make_pool(KEYS, scheduler=scheduler)
    ref.append(pool)
    key = pool.acquire(timeout=5)
    # First choice key-1 became ineligible; the fresh snapshot no longer offers it.
    assert scheduler.calls == [["key-1", "key-2", "key-3"], ["key-2", "key-3"]]
    assert key.name == "key-2"
    assert held_by_name(pool) == {"key-1": 0, "key-2": 1, "key-3": 0}
    pool.release(key)


def test_fallback_to_the_pool_strategy_is_logged_once_per_pool(make_pool, caplog):
    ref: List[Any] = []
    keys = [secret(i) for i in range(6)]
    scheduler = TakenAway(ref, times=1000)
    pool = make_pool(keys, scheduler=scheduler)
    ref.append(pool)
    caplog.set_level(logging.WARNING, logger="keymesh")
    got = []
    for _ in range(2):
        key = pool.acquire(timeout=5)
        got.append(key)
    # Each acquire gave the scheduler MAX_RETRIES + 1 chances, then the pool chose.
    assert len(scheduler.calls) == 2 * (_choose.MAX_RETRIES + 1)
    assert all(k.name != scheduler.disabled for k in got)
    assert held_by_name(pool)[got[0].name] >= 1
    fallbacks = [r for r in caplog.records if "fall back to the pool's strategy" in r.getMessage()]
    assert len(fallbacks) == 1
    for k in got:
        pool.release(k)


# ---- None waits ------------------------------------------------------------------

class Never(BaseScheduler):
    def __init__(self) -> None:
        self.calls = 0

    def select(self, candidates: Sequence[KeyView]) -> Optional[KeyView]:
        self.calls += 1
        return None


def test_none_waits_without_polling_and_then_times_out(make_pool):
    scheduler = Never()
    pool = make_pool(KEYS, scheduler=scheduler)
    t0 = time.monotonic()
    with pytest.raises(keymesh.NoAvailableKeyError, match="chose none"):
        pool.acquire(timeout=0.3)
    waited = time.monotonic() - t0
    assert 0.29 <= waited < 3.0
    # Asked once, then once more when the wait ended: it slept, it did not poll.
    assert scheduler.calls <= 3
    assert pool.held_count() == 0
    assert held_by_name(pool) == {"key-1": 0, "key-2": 0, "key-3": 0}


class IdleOnly(BaseScheduler):
    """key-1, only when nobody holds it (None otherwise; ``declined`` is set then)."""

    def __init__(self) -> None:
        self.declined = threading.Event()

    def select(self, candidates: Sequence[KeyView]) -> Optional[KeyView]:
        for c in candidates:
            if c.name == "key-1" and c.active_requests == 0:
                return c
        self.declined.set()
        return None


def wait_for(event: threading.Event) -> None:
    assert event.wait(10), "the scheduler was never asked"


def test_a_waiting_acquire_wakes_when_a_release_makes_the_choice_possible(make_pool):
    scheduler = IdleOnly()
    pool = make_pool(KEYS, scheduler=scheduler)
    first = pool.acquire(timeout=5)
    assert first.name == "key-1"
    release_at: List[float] = []

    def release_soon():
        # Once the waiter declined: whether it is asleep yet or not, the
        # snapshot's wake_seq makes it see this release.
        wait_for(scheduler.declined)
        release_at.append(time.monotonic())
        pool.release(first)

    t = threading.Thread(target=release_soon)
    t.start()
    second = pool.acquire(timeout=20)
    woke = time.monotonic()
    t.join()
    assert second.name == "key-1"
    assert woke - release_at[0] < 2.0  # woken by the release, long before the timeout
    pool.release(second)


def test_timeout_zero_is_one_attempt(make_pool):
    pool = make_pool(KEYS, scheduler=Never())
    t0 = time.monotonic()
    with pytest.raises(keymesh.NoAvailableKeyError):
        pool.acquire(timeout=0)
    assert time.monotonic() - t0 < 1.0


# ---- what select may return --------------------------------------------------------

class Returns(BaseScheduler):
    def __init__(self, fn) -> None:
        self.fn = fn

    def select(self, candidates: Sequence[KeyView]) -> Optional[KeyView]:
        return self.fn(candidates)


@pytest.mark.parametrize("bad", [
    lambda c: c[0].key,                                       # the secret, not the view
    lambda c: KeyView(key=c[0].key, name=c[0].name),           # a look-alike, not a candidate
    lambda c: 3,
])
def test_a_return_that_is_not_a_candidate_is_a_clear_error(make_pool, bad):
    pool = make_pool(KEYS, scheduler=Returns(bad))
    with pytest.raises(keymesh.KeyMeshError, match="not one of its candidates") as info:
        pool.acquire(timeout=1)
    assert KEYS[0] not in str(info.value)
    assert pool.held_count() == 0


def test_an_exception_from_select_propagates(make_pool):
    def boom(c):
        raise ValueError("scheduler bug")

    pool = make_pool(KEYS, scheduler=Returns(boom))
    with pytest.raises(ValueError, match="scheduler bug"):
        pool.acquire(timeout=1)
    assert pool.held_count() == 0


# ---- views ------------------------------------------------------------------------

def test_views_are_read_only_masked_and_carry_the_original_fields(make_pool):
    seen: List[KeyView] = []

    def keep(c):
        seen.extend(c)
        return c[0]

    pool = make_pool(KEYS, scheduler=Returns(keep))
    key = pool.acquire(timeout=5)
    pool.release(key, latency=0.5)
    key = pool.acquire(timeout=5)
    pool.mark_failed(key)
    seen.clear()
    key = pool.acquire(timeout=5)
    v = next(x for x in seen if x.name == "key-1")
    assert v.key == KEYS[0] and v.active_requests == 0 and v.weight == 1
    assert v.success_count == 1 and v.failure_count == 1 and v.latency_avg == pytest.approx(0.5)
    assert 0.0 < v.last_used <= time.monotonic()
    assert v.cooldown_until == 0.0 and not v.is_cooling_down and v.cooldown_remaining == 0.0
    assert v.is_available and not v.is_exhausted and v.max_failures == 10
    assert v.health_score == pytest.approx(0.5 / 1.5)
    never = next(x for x in seen if x.name == "key-3")
    assert never.last_used == 0.0 and never.health_score == 1.0
    for field in ("key", "active_requests", "cooldown_until", "success_count", "name", "_available"):
        with pytest.raises(AttributeError, match="read-only"):
            setattr(v, field, 1)
    with pytest.raises(AttributeError):
        del v.key
    assert KEYS[0] not in repr(v) and KEYS[0][-4:] in repr(v)
    snap = v.snapshot()
    assert list(snap) == ["key_suffix", "active_requests", "cooldown_until", "cooldown_remaining", "success_count",
                          "failure_count", "latency_avg", "last_used", "is_available", "health_score"]
    assert KEYS[0] not in str(snap)
    pool.release(key)


def test_a_cooling_key_is_no_candidate(make_pool):
    seen: List[List[str]] = []

    def keep(c):
        seen.append([x.name for x in c])
        return c[0]

    pool = make_pool(KEYS, scheduler=Returns(keep))
    key = pool.acquire(timeout=5)
    pool.mark_rate_limited(key, cooldown=60)
    key = pool.acquire(timeout=5)
    assert seen[-1] == ["key-2", "key-3"] and key.name == "key-2"
    pool.release(key)


# ---- the built-ins -----------------------------------------------------------------

def view(name: str, **kw: Any) -> KeyView:
    return KeyView(key=f"sk-{name}-0123456789", name=name, **kw)


def test_builtin_selects_work_on_views():
    a = view("a", active_requests=1, last_used=5.0)
    b = view("b", active_requests=0, last_used=9.0)
    c = view("c", active_requests=0, last_used=2.0)
    d = view("d", active_requests=0, last_used=0.0)
    assert LeastBusyScheduler().select([a, b, c]) is c
    assert LeastBusyScheduler().select([a, b, c, d]) is d      # never used wins the tie
    assert LeastBusyScheduler().select([]) is None
    # Round robin on views follows each key's own last use: no skip when a
    # key leaves the candidates (the original's defect 13).
    assert RoundRobinScheduler().select([a, b, c]) is c
    assert RoundRobinScheduler().select([a, b]) is a
    assert RoundRobinScheduler().select([]) is None
    # Weighted: reproducible with its own generator; a key that only failed
    # still has a share (the original gave it 0); weight counts.
    failing = view("f", failure_count=5, has_latency=True, latency_avg=0.1)
    fresh = view("n")
    heavy = view("h", weight=4, success_count=10, has_latency=True, latency_avg=0.1)
    assert WeightedScheduler.share(failing) > 0
    assert WeightedScheduler.share(heavy) > WeightedScheduler.share(view("l", success_count=10, has_latency=True,
                                                                        latency_avg=0.1))
    picks1 = [WeightedScheduler(random.Random(7)).select([failing, fresh, heavy]) for _ in range(1)]
    w = WeightedScheduler(random.Random(7))
    w2 = WeightedScheduler(random.Random(7))
    seq1 = [w.select([failing, fresh, heavy]).name for _ in range(200)]
    seq2 = [w2.select([failing, fresh, heavy]).name for _ in range(200)]
    assert seq1 == seq2 and picks1[0] is not None
    assert seq1.count("h") > seq1.count("f") > 0
    assert WeightedScheduler().select([]) is None


def test_a_builtin_scheduler_runs_natively(make_pool):
    pool = make_pool(KEYS, scheduler=RoundRobinScheduler(), strategy="round_robin")
    assert vars(pool)["acquire"] == pool._core.native.acquire  # the extension's own acquire: the fast path
    assert pool.status()["scheduler"] == SchedulerStrategy.ROUND_ROBIN
    assert [pool.acquire(timeout=1).name for _ in range(3)] == ["key-1", "key-2", "key-3"]


def test_a_builtin_scheduler_selects_the_embedded_strategy():
    pool = keymesh.SyncKeyPool(KEYS, scheduler=build_scheduler("weighted"))
    try:
        assert vars(pool)["acquire"] == pool._core.native.acquire  # the extension's: the fast path
        assert pool.status()["scheduler"] == SchedulerStrategy.WEIGHTED
    finally:
        pool.close()


def test_names_stay_importable_where_they_were():
    from keymesh import BaseScheduler as B, RoundRobinScheduler as R, build_scheduler as bs  # noqa: F401
    from keymesh.scheduler.base import BaseScheduler as B2, SchedulerStrategy as S, build_scheduler as bs2
    from keymesh.scheduler.least_busy import LeastBusyScheduler as L
    from keymesh.scheduler.round_robin import RoundRobinScheduler as R2
    from keymesh.scheduler.weighted import WeightedScheduler as W
    assert B is B2 and R is R2 and bs is bs2 and S.LEAST_BUSY == "least_busy"
    assert isinstance(bs("round_robin"), R) and isinstance(bs("least_busy"), L) and isinstance(bs("weighted"), W)
    with pytest.raises(ValueError):
        bs("nope")
    with pytest.raises(TypeError):
        BaseScheduler()  # abstract, as the original's


# ---- asyncio -----------------------------------------------------------------------

def run_debug(coro, caplog):
    """Runs coro with the loop's debug mode on; a callback that blocks the loop
    (slow_callback_duration) is logged by asyncio, which fails the test."""
    caplog.set_level(logging.WARNING, logger="asyncio")

    async def main():
        loop = asyncio.get_running_loop()
        loop.slow_callback_duration = 0.1
        return await coro

    result = asyncio.run(main(), debug=True)
    slow = [r.getMessage() for r in caplog.records if r.name == "asyncio" and "Executing" in r.getMessage()]
    assert not slow, f"the event loop was blocked: {slow}"
    return result


def test_asyncio_custom_scheduler_chooses_and_waits_in_a_helper_thread(make_pool, caplog):
    scheduler = IdleOnly()
    pool = make_pool(KEYS, cls=keymesh.KeyPool, scheduler=scheduler)

    async def declined():
        deadline = time.monotonic() + 10
        while not scheduler.declined.is_set():
            assert time.monotonic() < deadline, "the scheduler was never asked"
            await asyncio.sleep(0.005)
        scheduler.declined.clear()

    async def scenario():
        first = await pool.acquire(timeout=5)
        assert first.name == "key-1"
        waiter = asyncio.create_task(pool.acquire(timeout=20))
        await declined()
        assert not waiter.done()
        await pool.release(first)
        second = await asyncio.wait_for(waiter, 5)
        assert second.name == "key-1"
        await pool.release(second)
        # A waiting acquire cancelled: its helper's wait ends, nothing is held.
        held = await pool.acquire(timeout=5)
        waiting = asyncio.create_task(pool.acquire(timeout=20))
        await declined()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await pool.release(held)
        assert pool.held_count() == 0
        # None until the timeout: NoAvailableKeyError, the loop never blocked.
        pool2 = keymesh.KeyPool(KEYS, scheduler=Never())
        try:
            with pytest.raises(keymesh.NoAvailableKeyError):
                await pool2.acquire(timeout=0.2)
        finally:
            await pool2.close()

    run_debug(scenario(), caplog)
    deadline = time.monotonic() + 5
    while any(t.name == "keymesh-wait" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "a helper thread outlived its wait"
        time.sleep(0.01)


def test_threads_share_one_custom_scheduler_and_the_accounting_stays_exact(make_pool):
    pool = make_pool([{"secret": s, "max_concurrency": 2} for s in KEYS], scheduler=LeastLoadedLast())
    errors: List[BaseException] = []
    peak: List[int] = []

    def worker():
        try:
            for _ in range(50):
                key = pool.acquire(timeout=10)
                peak.append(max(k["active_requests"] for k in pool.status()["keys"]))
                pool.release(key)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert max(peak) <= 2  # every acquire-this-key kept the concurrency cap
    status = pool.status()
    assert sum(k["success_count"] for k in status["keys"]) == 400
    assert all(k["active_requests"] == 0 for k in status["keys"])


class LeastLoadedLast(BaseScheduler):
    """The candidate with fewest in flight, ties to the last one."""

    def select(self, candidates: Sequence[KeyView]) -> Optional[KeyView]:
        return min(reversed(candidates), key=lambda c: c.active_requests)


def test_connect_with_a_builtin_of_another_strategy_runs_its_select_here():
    from conftest import BROKER, Broker, broker_available
    if not broker_available():
        pytest.fail(f"keymesh-broker not built ({BROKER})")
    broker = Broker(KEYS, {"strategy": "round_robin"})
    try:
        pool = keymesh.SyncKeyPool.connect("test", socket=broker.socket, scheduler=LeastBusyScheduler())
        same = keymesh.SyncKeyPool.connect("test", socket=broker.socket, scheduler=RoundRobinScheduler())
        try:
            # The custom path replaced pool's acquire; same keeps the extension's.
            assert vars(pool)["acquire"] != pool._core.native.acquire
            assert vars(same)["acquire"] == same._core.native.acquire
            a = pool.acquire(timeout=5)
            b = pool.acquire(timeout=5)
            assert {a.name, b.name} == {"key-1", "key-2"}
            pool.release(a)
            pool.release(b)
        finally:
            pool.close()
            same.close()
    finally:
        broker.stop()
