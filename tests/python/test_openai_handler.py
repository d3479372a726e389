"""OpenAIHandler / AsyncOpenAIHandler over httpx.MockTransport (no network):
each request's key comes from the pool and its outcome goes back to it."""
from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import time

import httpx
import pytest

import keymesh
from conftest import secret
from keymesh.integrations.openai_handler import AsyncOpenAIHandler, OpenAIHandler, limit_headers

KEYS = [secret(i) for i in range(2)]
URL = "https://api.example.test/v1/chat/completions"


def key_status(pool, name="key-1"):
    return next(k for k in pool.status()["keys"] if k["name"] == name)


def totals(pool):
    m = pool.status()["pool_metrics"]
    return m["total_releases"], m["total_failures"], m["total_rate_limited"]


class Recorder:
    """A MockTransport handler answering with `respond(request)`; records the
    Authorization header each request carried."""

    def __init__(self, respond):
        self.respond = respond
        self.auth = []

    def __call__(self, request):
        self.auth.append(request.headers.get("authorization"))
        return self.respond(request)


def handler_on(make_pool, respond, keys=KEYS[:1], **pool_options):
    pool = make_pool(keys, **pool_options)
    rec = Recorder(respond)
    return OpenAIHandler(pool=pool, transport=httpx.MockTransport(rec)), pool, rec


# ---- construction ------------------------------------------------------------
def test_importable_from_keymesh_and_the_original_place():
    assert keymesh.OpenAIHandler is OpenAIHandler and keymesh.AsyncOpenAIHandler is AsyncOpenAIHandler
    assert issubclass(OpenAIHandler, httpx.Client) and issubclass(AsyncOpenAIHandler, httpx.AsyncClient)


def test_original_constructor_owns_an_embedded_pool_and_closes_it_after_the_client():
    rec = Recorder(lambda r: httpx.Response(200, json={"ok": True}))
    client = OpenAIHandler(KEYS, strategy="round_robin", default_cooldown=5.0, max_failures=2, acquire_timeout=0.5,
                           transport=httpx.MockTransport(rec), base_url="https://api.example.test/v1")
    assert isinstance(client.pool, keymesh.SyncKeyPool)
    assert client.pool.status()["options"]["max_failures"] == 2
    assert client.get("/models").json() == {"ok": True}
    assert client.post("/models").status_code == 200
    assert rec.auth == [f"Bearer {KEYS[0]}", f"Bearer {KEYS[1]}"]   # round robin, one key per request
    pool = client.pool
    client.close()
    assert client.is_closed
    with pytest.raises(keymesh.PoolClosedError):
        pool.acquire(timeout=0)


def test_keys_or_pool_exactly_one():
    with pytest.raises(keymesh.ConfigError):
        OpenAIHandler()
    with pytest.raises(keymesh.ConfigError):
        OpenAIHandler(KEYS, pool=keymesh.SyncKeyPool(KEYS))
    with pytest.raises(keymesh.ConfigError):
        OpenAIHandler(pool=object())


def test_a_given_pool_is_not_closed_unless_asked(make_pool):
    client, pool, _ = handler_on(make_pool, lambda r: httpx.Response(200))
    client.close()
    key = pool.acquire(timeout=1)   # still open
    pool.release(key)
    client = OpenAIHandler(pool=pool, close_pool=True, transport=httpx.MockTransport(lambda r: httpx.Response(200)))
    client.close()
    with pytest.raises(keymesh.PoolClosedError):
        pool.acquire(timeout=0)


# ---- outcomes (sync) -----------------------------------------------------------
def test_success_releases_with_latency_and_usage_tokens(make_pool, caplog):
    caplog.set_level(logging.DEBUG)
    client, pool, rec = handler_on(make_pool, lambda r: httpx.Response(
        200, json={"id": "x", "usage": {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42}}))
    r = client.post(URL, json={"model": "m"}, headers={"Authorization": "Bearer user-set"})
    assert r.json()["usage"]["total_tokens"] == 42
    assert rec.auth == [f"Bearer {KEYS[0]}"]          # set per request, over the caller's
    assert "authorization" not in client.headers      # never stored on the client
    k = key_status(pool)
    assert (k["success_count"], k["tokens"], k["has_latency"], pool.held_count()) == (1, 42, True, 0)
    assert KEYS[0] not in caplog.text


@pytest.mark.parametrize("body", [b"not json", b'{"usage": {"total_tokens": -5}}', b'{"usage": {"total_tokens": true}}',
                                  b'[1, 2]', b'{"usage": "lots"}'])
def test_odd_usage_bodies_release_without_tokens(make_pool, body):
    client, pool, _ = handler_on(make_pool, lambda r: httpx.Response(
        200, content=body, headers={"content-type": "application/json"}))
    client.get(URL)
    k = key_status(pool)
    assert (k["success_count"], k["tokens"]) == (1, 0)


def test_a_client_error_other_than_auth_is_not_the_keys_fault(make_pool):
    client, pool, _ = handler_on(make_pool, lambda r: httpx.Response(400, json={"error": "bad request"}))
    assert client.get(URL).status_code == 400
    assert totals(pool) == (1, 0, 0)


@pytest.mark.parametrize("headers,cooldown", [
    ({"retry-after": "7"}, 7.0),
    ({"retry-after-ms": "1500"}, 1.5),
    ({"retry-after-ms": "2500", "retry-after": "9"}, 2.5),
    ({"retry-after": "<HTTP-date in 20 s>"}, 20.0),
    ({}, 33.0),                       # none: the pool's default
    ({"retry-after": "soon"}, 33.0),  # malformed: the default, logged
])
def test_429_cools_the_key_for_what_the_provider_asks(make_pool, headers, cooldown):
    if headers.get("retry-after") == "<HTTP-date in 20 s>":  # made now, not at collection
        headers = {"retry-after": email.utils.formatdate(time.time() + 20, usegmt=True)}
    client, pool, _ = handler_on(make_pool, lambda r: httpx.Response(429, headers=headers), default_cooldown=33.0)
    assert client.get(URL).status_code == 429   # returned to the caller, not retried
    k = key_status(pool)
    assert k["rate_limited_count"] == 1 and not k["is_available"] and pool.held_count() == 0
    assert cooldown - 1.5 <= k["cooldown_remaining"] <= cooldown + 0.05


@pytest.mark.parametrize("code", [401, 403])
def test_auth_failure_revokes_the_key(make_pool, code):
    client, pool, _ = handler_on(make_pool, lambda r: httpx.Response(code), keys=KEYS)
    assert client.get(URL).status_code == code
    revoked = [k for k in pool.status()["keys"] if k["state"] == "revoked"]
    assert len(revoked) == 1 and pool.available_count() == 1 and pool.held_count() == 0


def test_server_error_is_a_failure(make_pool):
    client, pool, _ = handler_on(make_pool, lambda r: httpx.Response(503), max_failures=5)
    for _ in range(2):
        assert client.get(URL).status_code == 503
    k = key_status(pool)
    assert (k["failure_count"], k["success_count"], k["fail_streak"]) == (2, 0, 2)


def test_exhaustion_is_logged_not_raised(make_pool, caplog):
    client, pool, _ = handler_on(make_pool, lambda r: httpx.Response(500), max_failures=1)
    assert client.get(URL).status_code == 500
    assert pool.available_count() == 0 and KEYS[0] not in caplog.text


def test_transport_error_marks_failed_and_propagates(make_pool):
    def boom(request):
        raise httpx.ConnectError("refused", request=request)

    client, pool, _ = handler_on(make_pool, boom)
    with pytest.raises(httpx.ConnectError):
        client.get(URL)
    assert totals(pool) == (0, 1, 0) and pool.held_count() == 0


def test_keyboard_interrupt_cancels_the_lease_without_an_outcome(make_pool):
    def interrupted(request):
        raise KeyboardInterrupt

    client, pool, _ = handler_on(make_pool, interrupted)
    with pytest.raises(KeyboardInterrupt):
        client.get(URL)
    k = key_status(pool)
    assert totals(pool) == (0, 0, 0) and k["cancelled_count"] == 1 and pool.held_count() == 0


def test_rate_limit_headers_reach_the_pool(make_pool):
    client, pool, _ = handler_on(make_pool, lambda r: httpx.Response(200, headers={
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "12s", "x-request-id": "abc"}))
    client.get(URL)
    k = key_status(pool)
    assert k["success_count"] == 1 and not k["is_available"] and 10.0 < k["cooldown_remaining"] <= 12.0


def test_anthropic_rate_limit_headers_are_translated(make_pool):
    reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 15))
    client, pool, _ = handler_on(make_pool, lambda r: httpx.Response(200, headers={
        "anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": reset}))
    client.get(URL)
    k = key_status(pool)
    assert not k["is_available"] and 12.0 < k["cooldown_remaining"] <= 15.5
    assert limit_headers(httpx.Headers({"anthropic-ratelimit-tokens-remaining": "7", "other": "x"})) == [
        ("x-ratelimit-remaining-tokens", "7")]


def test_malformed_rate_limit_headers_are_logged_and_the_response_kept(make_pool, caplog):
    client, pool, _ = handler_on(make_pool, lambda r: httpx.Response(200, headers={
        "x-ratelimit-remaining-requests": "lots\x1b[31m"}))
    assert client.get(URL).status_code == 200
    assert key_status(pool)["success_count"] == 1
    assert "x-ratelimit-remaining-requests" in caplog.text and "\x1b" not in caplog.text


def test_an_anthropic_reset_without_a_time_zone_is_logged_and_the_response_kept(make_pool, caplog):
    client, pool, _ = handler_on(make_pool, lambda r: httpx.Response(200, headers={
        "anthropic-ratelimit-requests-reset": "2030-01-01T00:00:00"}))
    assert client.get(URL).status_code == 200
    assert key_status(pool)["success_count"] == 1 and pool.held_count() == 0
    assert "time zone" in caplog.text


def test_streamed_response_reports_when_closed(make_pool):
    def chunks():
        yield b"data: 1\n\n"
        yield b"data: 2\n\n"

    client, pool, _ = handler_on(make_pool, lambda r: httpx.Response(200, content=chunks()))
    with client.stream("POST", URL) as r:
        assert pool.held_count() == 1                 # the lease lasts while the body is read
        assert next(r.iter_raw()) == b"data: 1\n\n"
        assert key_status(pool)["success_count"] == 0 and pool.held_count() == 1
    assert key_status(pool)["success_count"] == 1 and pool.held_count() == 0
    with client.stream("POST", URL) as r:             # read to the end: httpx closes it, we report
        assert b"".join(r.iter_bytes()) == b"data: 1\n\ndata: 2\n\n"
        assert key_status(pool)["success_count"] == 2 and pool.held_count() == 0


def test_streamed_body_error_is_a_failure(make_pool):
    def chunks():
        yield b"data: 1\n\n"
        raise httpx.ReadError("reset")

    client, pool, _ = handler_on(make_pool, lambda r: httpx.Response(200, content=chunks()))
    with pytest.raises(httpx.ReadError):
        with client.stream("GET", URL) as r:
            for _ in r.iter_bytes():
                pass
    assert totals(pool) == (0, 1, 0) and pool.held_count() == 0


def test_streamed_429_is_reported_at_once(make_pool):
    client, pool, _ = handler_on(make_pool, lambda r: httpx.Response(429, headers={"retry-after": "3"}))
    with client.stream("GET", URL) as r:
        assert r.status_code == 429 and pool.held_count() == 0
    assert totals(pool) == (0, 0, 1)


# ---- async ---------------------------------------------------------------------
pytestmark_async = pytest.mark.usefixtures("asyncio_debug")


def async_handler_on(make_pool, respond, **pool_options):
    pool = make_pool(KEYS[:1], cls=keymesh.KeyPool, **pool_options)
    rec = Recorder(respond)
    return AsyncOpenAIHandler(pool=pool, transport=httpx.MockTransport(rec)), pool, rec


@pytestmark_async
def test_async_outcomes(make_pool):
    replies = iter([httpx.Response(200, json={"usage": {"total_tokens": 9}}),
                    httpx.Response(429, headers={"retry-after": "0"}),
                    httpx.Response(500)])
    client, pool, rec = async_handler_on(make_pool, lambda r: next(replies))

    async def main():
        assert (await client.get(URL)).status_code == 200
        assert (await client.get(URL)).status_code == 429
        assert (await client.get(URL)).status_code == 500
        await client.aclose()

    asyncio.run(main())
    k = key_status(pool)
    assert (k["success_count"], k["tokens"], k["rate_limited_count"], k["failure_count"]) == (1, 9, 1, 1)
    assert rec.auth == [f"Bearer {KEYS[0]}"] * 3 and pool.held_count() == 0


@pytestmark_async
def test_async_transport_error_and_cancellation(make_pool):
    gate = {}

    async def respond(request):
        if request.url.path.endswith("/fail"):
            raise httpx.ReadTimeout("slow", request=request)
        gate["entered"].set()
        await asyncio.sleep(30)
        return httpx.Response(200)

    pool = make_pool(KEYS[:1], cls=keymesh.KeyPool)
    client = AsyncOpenAIHandler(pool=pool, transport=httpx.MockTransport(respond))

    async def main():
        gate["entered"] = asyncio.Event()
        with pytest.raises(httpx.ReadTimeout):
            await client.get(URL + "/fail")
        task = asyncio.ensure_future(client.get(URL))
        await gate["entered"].wait()
        assert pool.held_count() == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await client.aclose()

    asyncio.run(main())
    k = key_status(pool)
    assert (k["failure_count"], k["cancelled_count"], k["success_count"], pool.held_count()) == (1, 1, 0, 0)


@pytestmark_async
def test_async_stream_and_owned_pool_closed_by_aclose():
    async def body():
        yield b"chunk-1 "
        yield b"chunk-2"

    async def main():
        client = AsyncOpenAIHandler(KEYS, transport=httpx.MockTransport(lambda r: httpx.Response(200, content=body())))
        pool = client.pool
        async with client.stream("GET", URL) as r:
            assert pool.held_count() == 1
            assert b"".join([c async for c in r.aiter_bytes()]) == b"chunk-1 chunk-2"
        assert pool.held_count() == 0
        assert sum(k["success_count"] for k in pool.status()["keys"]) == 1
        await client.aclose()
        with pytest.raises(keymesh.PoolClosedError):
            await pool.acquire(timeout=0)

    asyncio.run(main())


# ---- forked workers ------------------------------------------------------------
def test_handler_made_before_fork_reports_from_every_worker(make_pool):
    from test_processes import fork, wait_ok

    replies = {"n": 0}

    def respond(request):
        replies["n"] += 1
        if request.url.path.endswith("/limited"):
            return httpx.Response(429, headers={"retry-after": "30"})
        return httpx.Response(200, json={"usage": {"total_tokens": 10}})

    client, pool, _ = handler_on(make_pool, respond, keys=KEYS)

    def worker():
        for _ in range(3):
            assert client.get(URL).status_code == 200
        assert pool.held_count() == 0

    pids = [fork(worker) for _ in range(2)]
    for pid in pids:
        wait_ok(pid)
    keys = pool.status()["keys"]
    assert sum(k["success_count"] for k in keys) == 6 and sum(k["tokens"] for k in keys) == 60
    pid = fork(lambda: client.get(URL + "/limited"))   # a 429 in a worker cools the key for all
    wait_ok(pid)
    assert pool.available_count() == 1 and replies["n"] == 0   # the parent sent nothing itself
