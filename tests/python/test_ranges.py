"""Every number the package hands to ctypes is range-checked first (review
KM-23): ctypes would store rpm=2**32 as 0 (unlimited), max_concurrency=-1 as
4294967295 and tokens=-1 as 2**64-1 without a word. Out-of-range values
raise ConfigError, which is also a ValueError (the original package raised
ValueError for bad configuration). And what the pool then does with
in-range but hostile values: capped, never stored (KM-08, KM-10, KM-11)."""
from __future__ import annotations

import pytest

import keymesh
from conftest import secret

U32 = 2**32
U64 = 2**64


@pytest.mark.parametrize("field,value", [
    ("rpm", U32), ("rpm", -1), ("rpm", 2**40 + 5),
    ("max_concurrency", -1), ("max_concurrency", U32),
    ("weight", U32), ("weight", -3),
    ("tpm", U64), ("tpm", -1),
    ("burst", U32), ("burst", 1_000_001),
    ("rpm", 2.5), ("rpm", True), ("rpm", "100"), ("tpm", float("inf")),
])
def test_out_of_range_key_fields_are_config_errors(field, value) -> None:
    with pytest.raises(keymesh.ConfigError) as e:
        keymesh.SyncKeyPool([{"secret": secret(1), field: value}])
    assert isinstance(e.value, ValueError)
    assert field in str(e.value)


def test_in_range_extremes_are_kept_exactly() -> None:
    pool = keymesh.SyncKeyPool([{"secret": secret(1), "rpm": U32 - 1, "tpm": U64 - 1, "max_concurrency": U32 - 1,
                                 "weight": 7.0}])
    try:
        raw = pool._core.status_raw()["keys"][0]
        assert (raw["rpm"], raw["tpm"], raw["max_concurrency"], raw["weight"]) == (U32 - 1, U64 - 1, U32 - 1, 7)
    finally:
        pool.close()


@pytest.mark.parametrize("option,value", [
    ("max_failures", U32), ("max_failures", U32 + 1), ("max_failures", 0), ("max_failures", -1),
    ("max_failures", 2.5),
    ("default_cooldown", -1.0), ("default_cooldown", float("nan")), ("default_cooldown", 1e10),
    ("acquire_timeout", float("inf")), ("acquire_timeout", -0.5), ("acquire_timeout", 10**400),
    ("rate_margin", float("nan")),
    ("max_leases_per_process", 0), ("max_leases_per_process", U32), ("max_leases_per_process", -1),
])
def test_out_of_range_pool_options_are_config_errors(option, value) -> None:
    with pytest.raises(keymesh.ConfigError) as e:
        keymesh.SyncKeyPool([secret(1)], **{option: value})
    assert option in str(e.value)


@pytest.mark.parametrize("call", [
    lambda p: p.acquire(tokens=-1),
    lambda p: p.acquire(tokens=U64),
    lambda p: p.acquire(tokens=1.5),
    lambda p: p.acquire(timeout=-1),
    lambda p: p.acquire(timeout=1e10),
    lambda p: p.acquire(timeout=float("nan")),
])
def test_out_of_range_acquire_arguments_are_config_errors(call) -> None:
    pool = keymesh.SyncKeyPool([secret(1)])
    try:
        with pytest.raises(keymesh.ConfigError):
            call(pool)
        assert pool.status()["keys"][0]["active_requests"] == 0  # nothing was granted
    finally:
        pool.close()


def test_out_of_range_release_arguments_are_config_errors() -> None:
    pool = keymesh.SyncKeyPool([{"secret": secret(1), "tpm": 100000}])
    try:
        key = pool.acquire()
        for kwargs in ({"tokens": -1}, {"tokens": U64}, {"latency": -2.0}, {"latency": float("inf")}):
            with pytest.raises(keymesh.ConfigError):
                pool.release(key, **kwargs)
        with pytest.raises(keymesh.ConfigError):
            pool.mark_rate_limited(key, cooldown=-5)
        pool.release(key, tokens=10)  # still held: the bad calls changed nothing
    finally:
        pool.close()


def test_broker_reclaim_pid_is_range_checked() -> None:
    for pid in (0, -1, 2**31, 2**32 + 1):
        with pytest.raises(keymesh.ConfigError):
            keymesh._core.broker_reclaim(pid, "/nonexistent/km.sock")


def test_tokens_beyond_the_minute_are_refused(make_pool) -> None:
    pool = make_pool([{"secret": secret(1), "tpm": 1000}])
    with pytest.raises(keymesh.ConfigError) as e:
        pool.acquire(tokens=2**64 - 1)
    assert "tpm 1000" in str(e.value)
    key = pool.acquire(tokens=1000)  # the whole minute is allowed
    pool.release(key)


def test_mark_rate_limited_1e9_is_capped_at_max_cooldown(make_pool) -> None:
    pool = make_pool([secret(1)])
    key = pool.acquire()
    pool.mark_rate_limited(key, cooldown=1e9)
    remaining = pool.status()["keys"][0]["cooldown_remaining"]
    assert 0 < remaining <= 600.0  # the pool's max_cooldown


def test_a_retry_after_in_2049_is_capped(make_pool) -> None:
    assert keymesh.parse_retry_after("Fri, 01 Jan 2049 00:00:00 GMT") == 86400.0
    pool = make_pool([secret(1)])
    key = pool.acquire()
    pool.observe_limits(key, {"Retry-After": "Fri, 01 Jan 2049 00:00:00 GMT"})
    pool.release(key)
    assert 0 < pool.status()["keys"][0]["cooldown_remaining"] <= 600.0


def test_one_process_cannot_take_the_whole_table() -> None:
    pool = keymesh.SyncKeyPool([secret(1)], max_leases_per_process=2)
    try:
        held = [pool.acquire(), pool.acquire()]
        with pytest.raises(keymesh.KeyMeshError) as e:
            pool.acquire(timeout=0.05)  # waits for one of its own leases, then gives up
        assert "max_leases_per_process" in str(e.value)
        pool.release(held.pop())
        held.append(pool.acquire(timeout=0))
        for key in held:
            pool.release(key)
    finally:
        pool.close()
