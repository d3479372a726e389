"""A local mock of an LLM API provider, for the farm benchmark and the demo.

It enforces, per API key, what real providers enforce:
  * a request rate quantized per wall-clock second (rpm/60 requests in each
    second window), answering 429 with Retry-After when exceeded;
  * a maximum number of concurrent requests per key (429 as well);
  * 401 for revoked keys and unknown keys;
  * a latency with jitter for each accepted request.

A test hook for the cooldown propagation benchmark: a request with the header
"X-Mock-Status: 429" is refused with 429 and "Retry-After: <X-Mock-Retry-After
or 1>" whatever the key's budget (counted under "forced", not as a refusal).

It listens on 127.0.0.1 only. Counters are kept per key and served as JSON
at GET /stats, with the times of the rate refusals and of every call the
rate counted or refused (the first 100,000 a key, seconds after the last
POST /reset). Run standalone:  python3 mock_provider.py CONFIG.json
where CONFIG.json is {"port": 0, "latency_ms": 20, "jitter_ms": 5,
"keys": {"sk-...": {"rpm": 600, "max_concurrency": 8, "revoked": false}}};
it prints "listening PORT" on stdout once ready.
"""

from __future__ import annotations

import json
import math
import random
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class KeyLimits:
    def __init__(self, rpm: int, max_concurrency: int, revoked: bool) -> None:
        self.per_second = max(1, rpm // 60) if rpm > 0 else 0
        self.max_concurrency = max_concurrency
        self.revoked = revoked
        self.window = -1
        self.in_window = 0
        self.in_flight = 0
        self.ok = 0
        self.rate_limited = 0
        self.unauthorized = 0
        self.forced = 0
        self.refused_at: list[float] = []  # seconds after the last reset of each rate refusal (the first 1000)
        self.calls_at: list[float] = []  # seconds after the last reset of each call the rate counts or refuses
        self.lock = threading.Lock()


class Provider:
    def __init__(self, config: dict[str, Any]) -> None:
        self.latency = float(config.get("latency_ms", 20)) / 1000.0
        self.jitter = float(config.get("jitter_ms", 5)) / 1000.0
        self.keys: dict[str, KeyLimits] = {
            secret: KeyLimits(int(k.get("rpm", 0)), int(k.get("max_concurrency", 0)), bool(k.get("revoked", False)))
            for secret, k in config["keys"].items()
        }
        self.unknown = 0
        self.lock = threading.Lock()
        self.started = time.time()
        self.reset_at = self.started

    def admit(self, secret: str) -> tuple[int, float]:
        """Returns (status, retry_after_seconds)."""
        limits = self.keys.get(secret)
        if limits is None:
            with self.lock:
                self.unknown += 1
            return 401, 0.0
        with limits.lock:
            if limits.revoked:
                limits.unauthorized += 1
                return 401, 0.0
            now = time.time()
            window = math.floor(now)
            if limits.per_second and len(limits.calls_at) < 100000:
                limits.calls_at.append(round(now - self.reset_at, 4))
            if window != limits.window:
                limits.window = window
                limits.in_window = 0
            if limits.per_second and limits.in_window >= limits.per_second:
                limits.rate_limited += 1
                if len(limits.refused_at) < 1000:
                    limits.refused_at.append(round(now - self.reset_at, 3))
                return 429, max(0.001, window + 1 - now)
            if limits.max_concurrency and limits.in_flight >= limits.max_concurrency:
                limits.rate_limited += 1
                return 429, 0.05
            limits.in_window += 1
            limits.in_flight += 1
            return 200, 0.0

    def force_429(self, secret: str) -> bool:
        """The test hook: False for an unknown key."""
        limits = self.keys.get(secret)
        if limits is None:
            return False
        with limits.lock:
            limits.forced += 1
        return True

    def finish(self, secret: str) -> None:
        limits = self.keys[secret]
        with limits.lock:
            limits.in_flight -= 1
            limits.ok += 1

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"unknown_key": self.unknown, "keys": {}}
        for secret, k in self.keys.items():
            with k.lock:
                out["keys"]["..." + secret[-4:]] = {
                    "ok": k.ok, "rate_limited": k.rate_limited, "unauthorized": k.unauthorized,
                    "per_second": k.per_second, "revoked": k.revoked, "forced": k.forced,
                    "refused_at": list(k.refused_at), "calls_at": list(k.calls_at),
                }
        return out

    def reset(self) -> None:
        self.reset_at = time.time()
        for k in self.keys.values():
            with k.lock:
                k.ok = k.rate_limited = k.unauthorized = k.forced = 0
                k.refused_at = []
                k.calls_at = []
                k.window = -1
                k.in_window = 0
        self.unknown = 0


def make_handler(provider: Provider) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet server
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            if self.path == "/stats":
                self._send(200, json.dumps(provider.stats()).encode())
            else:
                self._send(404, b'{"error":"not found"}')

        def do_POST(self) -> None:  # noqa: N802 - http.server API
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            if self.path == "/reset":
                provider.reset()
                self._send(200, b"{}")
                return
            auth = self.headers.get("Authorization", "")
            secret = auth[7:] if auth.startswith("Bearer ") else ""
            if self.headers.get("X-Mock-Status") == "429" and provider.force_429(secret):
                try:
                    forced_retry = min(60.0, max(0.001, float(self.headers.get("X-Mock-Retry-After") or 1)))
                except ValueError:
                    forced_retry = 1.0
                self._send(429, b'{"error":"rate_limited"}', {"Retry-After": f"{forced_retry:.3f}"})
                return
            status, retry_after = provider.admit(secret)
            if status == 429:
                self._send(429, b'{"error":"rate_limited"}', {"Retry-After": f"{retry_after:.3f}"})
                return
            if status == 401:
                self._send(401, b'{"error":"invalid_api_key"}')
                return
            try:
                time.sleep(max(0.0, provider.latency + random.uniform(-provider.jitter, provider.jitter)))
                self._send(200, b'{"choices":[{"message":{"content":"ok"}}],"usage":{"total_tokens":42}}')
            finally:
                provider.finish(secret)

    return Handler


def serve(config: dict[str, Any]) -> tuple[ThreadingHTTPServer, Provider]:
    provider = Provider(config)
    server = ThreadingHTTPServer(("127.0.0.1", int(config.get("port", 0))), make_handler(provider))
    server.daemon_threads = True
    return server, provider


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as f:
        config = json.load(f)
    server, _ = serve(config)
    print(f"listening {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
