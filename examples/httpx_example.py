"""KeyMesh with httpx: the original's three integration patterns.

    PYTHONPATH=client/python python3 examples/httpx_example.py

Starts a tiny mock API on 127.0.0.1 (random port) that checks the bearer
key and answers 429 (Retry-After: 1) to every 5th request of a key, then:

1. An SDK-style client copied per request with the key
   (``client.with_options(api_key=key)``, as the OpenAI SDK offers): the
   copy shares the connection pool, nothing global is mutated.
2. The key passed as a per-request header (``extra_headers`` in the SDKs).
3. The lease() lifecycle: acquire, time, release or mark failed.

Never set ``client.api_key`` globally from a pool: concurrent requests would
race on it.
"""
from __future__ import annotations

import asyncio
import collections
import http.server
import json
import threading
from typing import Optional

import httpx

import keymesh

KEYS = ["sk-demo-key-aaaaaaaa0001", "sk-demo-key-bbbbbbbb0002", "sk-demo-key-cccccccc0003"]


# ---- a mock provider --------------------------------------------------------
class MockProvider(http.server.BaseHTTPRequestHandler):
    counts: "collections.Counter[str]" = collections.Counter()
    lock = threading.Lock()

    def do_POST(self) -> None:
        key = self.headers.get("Authorization", "").removeprefix("Bearer ")
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if key not in KEYS:
            self._reply(401, {"error": "invalid key"})
            return
        with self.lock:
            self.counts[key] += 1
            n = self.counts[key]
        if n % 5 == 0:
            self._reply(429, {"error": "rate limited"}, {"Retry-After": "1"})
        else:
            self._reply(200, {"answer": 42, "served_by": key[-4:]})

    def _reply(self, status: int, body: dict, headers: Optional[dict] = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def start_mock() -> tuple[http.server.ThreadingHTTPServer, str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), MockProvider)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def retry_after(resp: httpx.Response) -> Optional[float]:
    value = resp.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None  # None: the pool's default cooldown


# ---- pattern 1: an SDK-style client, copied per request with the key -------
class TinySDK:
    """Stands in for an SDK client (openai.OpenAI has the same with_options)."""

    def __init__(self, base_url: str, api_key: str = "", http_client: Optional[httpx.Client] = None) -> None:
        self.base_url = base_url
        self.api_key = api_key
        self._http = http_client or httpx.Client()

    def with_options(self, *, api_key: str) -> "TinySDK":
        return TinySDK(self.base_url, api_key, self._http)  # shares the connection pool

    def complete(self, prompt: str) -> httpx.Response:
        return self._http.post(f"{self.base_url}/v1/complete", json={"prompt": prompt},
                               headers={"Authorization": f"Bearer {self.api_key}"})


def pattern_with_options(pool: keymesh.SyncKeyPool, sdk: TinySDK) -> str:
    key = pool.acquire()
    try:
        resp = sdk.with_options(api_key=key).complete("hello")
    except Exception:
        pool.mark_failed(key)
        raise
    if resp.status_code == 429:
        pool.mark_rate_limited(key, cooldown=retry_after(resp))
    else:
        pool.release(key, latency=resp.elapsed.total_seconds())
    return f"with_options   -> {resp.status_code} {resp.text}"


# ---- pattern 2: the key as a per-request header -----------------------------
def pattern_header(pool: keymesh.SyncKeyPool, client: httpx.Client, base: str) -> str:
    key = pool.acquire()
    try:
        resp = client.post(f"{base}/v1/complete", json={"prompt": "hi"},
                           headers={"Authorization": f"Bearer {key}"})  # extra_headers=
    except Exception:
        pool.mark_failed(key)
        raise
    if resp.status_code == 429:
        pool.mark_rate_limited(key, cooldown=retry_after(resp))
    else:
        pool.release(key, latency=resp.elapsed.total_seconds())
    return f"extra_headers  -> {resp.status_code} {resp.text}"


# ---- pattern 3: the lease() lifecycle ---------------------------------------
def pattern_lease(pool: keymesh.SyncKeyPool, client: httpx.Client, base: str) -> str:
    with pool.lease() as key:  # release(measured latency) / mark_failed on exception
        resp = client.post(f"{base}/v1/complete", json={"prompt": "hey"},
                           headers={"Authorization": f"Bearer {key}"})
        if resp.status_code == 429:
            pool.mark_rate_limited(key, cooldown=retry_after(resp))  # lease() then reports nothing more
    return f"lease()        -> {resp.status_code} {resp.text}"


async def pattern_async(pool: keymesh.KeyPool, base: str) -> list[int]:
    async with httpx.AsyncClient() as client:
        async def one() -> int:
            async with pool.lease(timeout=5) as key:
                resp = await client.post(f"{base}/v1/complete", json={"prompt": "async"},
                                         headers={"Authorization": f"Bearer {key}"})
                if resp.status_code == 429:
                    await pool.mark_rate_limited(key, cooldown=retry_after(resp))
                return resp.status_code
        return await asyncio.gather(*(one() for _ in range(12)))


def main() -> None:
    server, base = start_mock()
    try:
        with keymesh.SyncKeyPool(KEYS, strategy="round_robin", default_cooldown=1.0) as pool, \
                httpx.Client() as client:
            sdk = TinySDK(base, http_client=client)
            for _ in range(3):
                print(pattern_with_options(pool, sdk))
                print(pattern_header(pool, client, base))
                print(pattern_lease(pool, client, base))
            m = pool.status()["pool_metrics"]
            print(f"sync:  acquires={m['total_acquires']} releases={m['total_releases']} "
                  f"429s={m['total_rate_limited']}")

        async def run_async() -> None:
            async with keymesh.KeyPool(KEYS, default_cooldown=1.0) as apool:
                codes = await pattern_async(apool, base)
                m = apool.status()["pool_metrics"]
                print(f"async: statuses={codes} acquires={m['total_acquires']}")

        asyncio.run(run_async())
    finally:
        server.shutdown()


if __name__ == "__main__":
    main()
