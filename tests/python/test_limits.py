"""Rate-limit-aware scheduling through the Python package: token budgets,
permanent (authentication) failures, observed rate-limit headers, and the
header parsers — for embedded and attached pools."""
from __future__ import annotations

import time

import pytest

import keymesh
from conftest import secret


def test_parse_helpers() -> None:
    assert keymesh.parse_retry_after("120") == 120.0
    assert keymesh.parse_retry_after("Thu, 01 Jan 1970 00:00:00 GMT") == 0.0  # in the past: now
    assert keymesh.parse_duration("6m0s") == 360.0
    assert keymesh.parse_duration("250ms") == pytest.approx(0.25)
    for bad in ("soon", "", "-1", "1e3"):
        with pytest.raises(ValueError):
            keymesh.parse_retry_after(bad)
    with pytest.raises(keymesh.ConfigError):
        keymesh.parse_duration("5 minutes")


def test_permanent_failure_revokes_until_reset(make_pool) -> None:
    pool = make_pool([secret(1), secret(2)], strategy="round_robin")
    key = pool.acquire()
    with pytest.raises(keymesh.KeyExhaustedError):
        pool.mark_failed(key, permanent=True)
    revoked = [k for k in pool.status()["keys"] if k["state"] == "revoked"]
    assert len(revoked) == 1
    for _ in range(6):  # only the other key is handed out
        other = pool.acquire(timeout=1)
        assert other != key
        pool.release(other)
    pool.reset_key(revoked[0]["name"])
    assert pool.available_count() == 2


def test_observed_headers_take_the_key_out_until_reset(make_pool) -> None:
    pool = make_pool([secret(1), secret(2)], strategy="round_robin")
    key = pool.acquire()
    pool.observe_limits(key, {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "30s"})
    pool.release(key)
    st = {k["name"]: k for k in pool.status()["keys"]}
    assert st[pool.key_name(key)]["cooldown_remaining"] == pytest.approx(30, abs=1)
    for _ in range(4):
        other = pool.acquire(timeout=1)
        assert other != key
        pool.release(other)
    with pytest.raises(keymesh.ConfigError) as e:
        held = pool.acquire(timeout=1)
        try:
            pool.observe_limits(held, [("retry-after", "later sk-do-not-echo")])
        finally:
            pool.release(held)
    assert "retry-after" in str(e.value).lower() and "sk-do-not-echo" not in str(e.value)


def test_token_budget_paces_acquires(make_pool) -> None:
    # 6000 tokens per minute = 100 per second, a bucket of one second.
    pool = make_pool([{"name": "t", "secret": secret(1), "tpm": 6000}])
    key = pool.acquire(timeout=1, tokens=100)
    pool.release(key, tokens=250)  # used more than reserved: 150 more debited
    t0 = time.monotonic()
    key = pool.acquire(timeout=5, tokens=10)  # waits for the bucket to refill (~1.5 s)
    waited = time.monotonic() - t0
    pool.release(key, tokens=10)
    assert 1.2 < waited < 2.5
    assert pool.status()["keys"][0]["tokens"] == 260


def test_async_acquire_with_tokens(make_pool) -> None:
    import asyncio

    async def main() -> None:
        pool = make_pool([{"name": "t", "secret": secret(1), "tpm": 60000}], cls=keymesh.KeyPool)
        key = await pool.acquire(timeout=1, tokens=500)
        await pool.release(key, tokens=400)
        assert pool.status()["keys"][0]["tokens"] == 400

    asyncio.run(main())


def test_burst_and_rate_margin_are_settable(make_pool) -> None:
    pool = make_pool([{"name": "paced", "secret": secret(1), "rpm": 60, "burst": 4, "rate_margin": 0.25},
                      {"name": "plain", "secret": secret(2), "rpm": 60}], rate_margin=0.125)
    st = pool.status()
    assert st["options"]["rate_margin"] == pytest.approx(0.125)
    keys = {k["name"]: k for k in st["keys"]}
    assert keys["paced"]["burst"] == 4 and keys["paced"]["rate_margin"] == pytest.approx(0.25)
    assert keys["plain"]["burst"] == 0 and keys["plain"]["rate_margin"] < 0  # the pool's
    # The mesh share fields travel (no mesh here: inactive, zero).
    for k in keys.values():
        assert (k["share_active"], k["share_rpm"], k["share_tpm"], k["share_burst"]) == (False, 0, 0, 0)
    # At 60 rpm less the margin a key is granted about once per 1.1-1.3 s:
    # back to back, the burst key gives 4 and the other one.
    granted = {"paced": 0, "plain": 0}
    while True:
        try:
            key = pool.acquire(timeout=0)
        except keymesh.NoAvailableKeyError:
            break
        granted[pool.key_name(key)] += 1
        pool.release(key)
    assert granted == {"paced": 4, "plain": 1}


@pytest.mark.parametrize("bad", [{"rate_margin": 0.7}, {"rate_margin": float("nan")}, {"burst": 2_000_000},
                                 {"burst": -1}, {"rate_margin": "x"}])
def test_bad_key_limits_are_config_errors(bad) -> None:
    with pytest.raises(keymesh.ConfigError):
        keymesh.SyncKeyPool([{"secret": secret(1), **bad}])


def test_add_key_takes_burst_and_rate_margin() -> None:
    # Embedded: the pool applies them itself (an attached pool forwards them
    # to the broker's add_key).
    pool = keymesh.SyncKeyPool([secret(1)], rate_margin=0.01)
    try:
        pool.add_key(secret(2), name="extra", rpm=120, burst=3, rate_margin=0.2)
        extra = next(k for k in pool.status()["keys"] if k["name"] == "extra")
        assert (extra["rpm"], extra["burst"]) == (120, 3)
        assert extra["rate_margin"] == pytest.approx(0.2)
        with pytest.raises(keymesh.ConfigError):
            pool.add_key(secret(3), rate_margin=0.5)
        with pytest.raises(keymesh.ConfigError):
            keymesh.SyncKeyPool([secret(1)], rate_margin=0.5)
    finally:
        pool.close()
