"""The original package's scenarios, for embedded and attached pools."""
from __future__ import annotations

import json
import time

import pytest

import keymesh
from conftest import secret

KEYS = [secret(i) for i in range(3)]


def test_acquire_returns_a_pool_key(make_pool):
    pool = make_pool(KEYS)
    key = pool.acquire()
    assert isinstance(key, str)
    assert key in KEYS
    assert key.name.startswith("key-")
    assert secret(0)[-4:] in repr(key) and key not in repr(key)  # repr is masked
    pool.release(key, latency=0.1)


def test_metrics_count(make_pool):
    pool = make_pool(KEYS, max_failures=5)
    for _ in range(4):
        pool.release(pool.acquire(), latency=0.01)
    pool.mark_failed(pool.acquire())
    pool.mark_rate_limited(pool.acquire(), cooldown=0.0)
    m = pool.status()["pool_metrics"]
    assert m["total_acquires"] == 6
    assert m["total_releases"] == 4
    assert m["total_failures"] == 1
    assert m["total_rate_limited"] == 1
    assert m["total_cooldowns"] == 1
    assert m["no_key_available_count"] == 0
    assert m["uptime"] >= 0 and m["uptime_seconds"] == m["uptime"]


def test_rate_limited_key_leaves_rotation(make_pool):
    pool = make_pool(KEYS, strategy="round_robin")
    limited = pool.acquire()
    pool.mark_rate_limited(limited, cooldown=60)
    assert pool.available_count() == 2
    for _ in range(12):
        key = pool.acquire()
        assert key != limited
        pool.release(key, latency=0.01)
    entry = next(k for k in pool.status()["keys"] if k["name"] == limited.name)
    assert entry["is_available"] is False
    assert 59 < entry["cooldown_remaining"] <= 60


def test_default_cooldown_applies(make_pool):
    pool = make_pool(KEYS[:1], default_cooldown=42.0)
    key = pool.acquire()
    pool.mark_rate_limited(key)
    remaining = pool.status()["keys"][0]["cooldown_remaining"]
    assert 41 < remaining <= 42


def test_exhaustion_raises_at_threshold(make_pool):
    pool = make_pool(KEYS[:2], max_failures=3, strategy="round_robin")
    victim = KEYS[0]
    raised = 0
    for _ in range(40):
        key = pool.acquire(timeout=1)
        if key != victim:
            pool.release(key, latency=0.01)
            continue
        try:
            pool.mark_failed(key)
        except keymesh.KeyExhaustedError as e:
            raised += 1
            assert victim not in str(e) and e.key == "..." + victim[-4:]
            break
    assert raised == 1
    st = {k["name"]: k for k in pool.status()["keys"]}
    assert st["key-1"]["failure_count"] == 3
    assert st["key-1"]["is_available"] is False
    assert pool.available_count() == 1
    for _ in range(5):  # never handed out again
        key = pool.acquire(timeout=1)
        assert key != victim
        pool.release(key)


def test_success_resets_failure_streak(make_pool):
    pool = make_pool(KEYS[:1], max_failures=2)
    pool.mark_failed(pool.acquire())
    pool.release(pool.acquire(), latency=0.1)
    pool.mark_failed(pool.acquire())  # streak 1 again: no exhaustion
    assert pool.available_count() == 1


def test_all_cooling_times_out_quickly(make_pool):
    pool = make_pool(KEYS[:2], acquire_timeout=0.1)
    for _ in range(2):
        pool.mark_rate_limited(pool.acquire(), cooldown=60)
    t0 = time.monotonic()
    with pytest.raises(keymesh.NoAvailableKeyError):
        pool.acquire()
    assert time.monotonic() - t0 < 0.5
    with pytest.raises(keymesh.NoAvailableKeyError):
        pool.acquire(timeout=0)
    assert pool.status()["pool_metrics"]["no_key_available_count"] == 2  # once per failed acquire


def test_round_robin_touches_every_key(make_pool):
    keys = [secret(i) for i in range(5)]
    pool = make_pool(keys, strategy=keymesh.SchedulerStrategy.ROUND_ROBIN)
    seen = []
    for _ in range(10):
        key = pool.acquire()
        seen.append(str(key))
        pool.release(key, latency=0.01)
    assert seen == keys + keys


@pytest.mark.parametrize("strategy", list(keymesh.SchedulerStrategy) + ["weighted", "least_busy"])
def test_every_strategy_acquires(make_pool, strategy):
    pool = make_pool(KEYS, strategy=strategy)
    held = [pool.acquire() for _ in range(6)]
    assert all(k in KEYS for k in held)
    for k in held:
        pool.release(k, latency=0.05)
    assert pool.status()["scheduler"] == keymesh.SchedulerStrategy(getattr(strategy, "value", strategy))


def test_least_busy_spreads_load(make_pool):
    pool = make_pool(KEYS)
    held = [pool.acquire() for _ in range(3)]
    assert sorted(held) == sorted(KEYS)
    assert all(k["active_requests"] == 1 for k in pool.status()["keys"])


def test_status_shape_and_masking(make_pool):
    pool = make_pool(KEYS + ["short-key"])
    key = pool.acquire()
    st = pool.status()
    assert set(st) >= {"pool_metrics", "scheduler", "keys"}
    assert st["scheduler"] == "least_busy" and isinstance(st["scheduler"], keymesh.SchedulerStrategy)
    assert set(st["pool_metrics"]) >= {"total_acquires", "total_releases", "total_failures",
                                       "total_rate_limited", "no_key_available_count", "uptime"}
    assert len(st["keys"]) == 4
    for entry in st["keys"]:
        assert set(entry) >= {"name", "key_suffix", "active_requests", "cooldown_remaining", "success_count",
                              "failure_count", "latency_avg", "is_available", "health_score"}
    suffixes = [k["key_suffix"] for k in st["keys"]]
    assert suffixes[:3] == ["..." + s[-4:] for s in KEYS]
    assert suffixes[3] == "***"  # too short to show any of it
    text = json.dumps(st)
    for s in KEYS:
        assert s not in text and s[:-4] not in text
    assert sum(k["active_requests"] for k in st["keys"]) == 1
    pool.release(key)


def test_ema_latency(make_pool):
    pool = make_pool(KEYS[:1])

    def avg():
        return pool.status()["keys"][0]["latency_avg"]

    pool.release(pool.acquire(), latency=0.5)
    assert avg() == pytest.approx(0.5)
    pool.release(pool.acquire(), latency=1.0)
    assert avg() == pytest.approx(0.6)
    pool.release(pool.acquire())  # no latency: the average is unchanged (defect 15)
    assert avg() == pytest.approx(0.6)
    pool.release(pool.acquire(), latency=0.0)  # a real zero sample counts
    assert avg() == pytest.approx(0.48)
    assert pool.status()["keys"][0]["health_score"] == pytest.approx(1 / 1.48, abs=1e-4)


def test_readmission_by_add_key(make_pool):
    pool = make_pool(KEYS[:2], max_failures=1, strategy="round_robin")
    key = pool.acquire()
    assert key == KEYS[0]
    with pytest.raises(keymesh.KeyExhaustedError):
        pool.mark_failed(key)
    assert pool.available_count() == 1
    pool.add_key(KEYS[0])
    assert pool.available_count() == 2
    entry = pool.status()["keys"][0]
    assert entry["is_available"] is True and entry["failure_count"] == 1  # counters kept


def test_add_new_key(make_pool):
    pool = make_pool(KEYS[:1])
    new = secret(99)
    pool.add_key(new, name="fresh")
    names = [k["name"] for k in pool.status()["keys"]]
    assert names == ["key-1", "fresh"]
    held = [pool.acquire(), pool.acquire()]
    assert sorted(held) == sorted([KEYS[0], new])


def test_unknown_key_errors(make_pool):
    pool = make_pool(KEYS)
    bogus = "sk-not-in-this-pool-0000"
    for call in (lambda: pool.release(bogus), lambda: pool.mark_failed(bogus),
                 lambda: pool.mark_rate_limited(bogus, cooldown=1)):
        with pytest.raises(keymesh.UnknownKeyError) as info:
            call()
        assert isinstance(info.value, KeyError) and isinstance(info.value, keymesh.KeyMeshError)
        assert bogus not in str(info.value)


def test_release_not_held_is_an_error(make_pool):
    pool = make_pool(KEYS)
    key = pool.acquire()
    pool.release(key, latency=0.1)
    with pytest.raises(keymesh.KeyNotHeldError):
        pool.release(key)
    with pytest.raises(keymesh.KeyNotHeldError):
        pool.release(str(key))  # a plain string: no lease of it is held either
    assert pool.status()["pool_metrics"]["total_releases"] == 1


def test_release_by_plain_string_ends_oldest(make_pool):
    pool = make_pool(KEYS[:1])
    a, b = pool.acquire(), pool.acquire()
    assert pool.held_count() == 2
    pool.release(str(a), latency=0.1)
    pool.release(b, latency=0.1)
    assert pool.held_count() == 0


def test_config_errors(mode):
    if mode != "embedded":
        pytest.skip("constructor only")
    with pytest.raises(keymesh.ConfigError) as info:
        keymesh.SyncKeyPool([])
    assert isinstance(info.value, ValueError)
    assert "at least one API key" in str(info.value)
    with pytest.raises(ValueError):
        keymesh.SyncKeyPool(["sk-dup-000000000000", "sk-dup-000000000000"])  # defect 21: no silent dedup
    with pytest.raises(ValueError):
        keymesh.SyncKeyPool(["   "])
    with pytest.raises(ValueError):
        keymesh.SyncKeyPool(KEYS, strategy="fastest")
    with pytest.raises(ValueError):
        keymesh.SyncKeyPool(KEYS, max_failures=0)
    pool = keymesh.SyncKeyPool(KEYS, scheduler=keymesh.RoundRobinScheduler())
    assert pool.status()["scheduler"] == "round_robin"
    pool.close()


def test_lease_context_manager(make_pool):
    pool = make_pool(KEYS[:1], max_failures=5)
    with pool.lease() as key:
        assert key == KEYS[0]
    with pytest.raises(RuntimeError):
        with pool.lease():
            raise RuntimeError("provider exploded")
    with pool.lease() as key:
        pool.mark_rate_limited(key, cooldown=0)  # reported inside: nothing more on exit
    st = pool.status()
    k = st["keys"][0]
    assert (k["success_count"], k["failure_count"], k["rate_limited_count"]) == (1, 1, 1)
    assert k["active_requests"] == 0 and k["latency_avg"] >= 0
    assert pool.held_count() == 0


def test_close_is_idempotent(make_pool):
    pool = make_pool(KEYS)
    pool.acquire()
    pool.close()
    pool.close()
    with pytest.raises(keymesh.PoolClosedError):
        pool.acquire()


def test_hot_calls_take_the_methods_arguments_and_keep_a_subclass_override(make_pool):
    # SyncKeyPool binds its hot calls to the extension; they take the same
    # positional and keyword arguments as the methods they stand for.
    pool = make_pool([secret(10), secret(11)])
    k = pool.acquire(timeout=1, tokens=2)
    pool.release(key=k, latency=0.1, tokens=3)
    k = pool.acquire(1)
    pool.mark_rate_limited(k, cooldown=0.01)
    k = pool.acquire()
    pool.cancel(key=k)
    k = pool.acquire()
    pool.mark_failed(k, permanent=False)
    assert pool.held_count() == 0
    with pytest.raises(TypeError, match="unexpected keyword argument 'timeuot'"):
        pool.acquire(timeuot=1)
    with pytest.raises(TypeError, match="multiple values for argument 'timeout'"):
        pool.acquire(1, timeout=1)
    with pytest.raises(TypeError, match="missing required argument 'key'"):
        pool.release()
    with pytest.raises(keymesh.ConfigError, match="latency"):
        pool.release(pool.acquire(), latency=-1)

    seen = []

    class Logged(keymesh.SyncKeyPool):
        def release(self, key, latency=None, tokens=0):
            seen.append(key.name)
            super().release(key, latency, tokens)

    logged = make_pool([secret(12)], cls=Logged)
    logged.release(logged.acquire())
    assert seen == [logged.key_name(secret(12))]
