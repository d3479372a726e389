"""A WSGI app that calls an HTTP API with keys from a KeyMesh pool.

The pool is created at import time, in the gunicorn master (preload_app =
True in gunicorn.conf.py), and shared by every worker: a 429 seen by one
worker takes the key out of rotation for all of them at once.

    KEYMESH_EXAMPLE_KEYS=sk-a...,sk-b... gunicorn -c examples/gunicorn/gunicorn.conf.py app:app

Attached to a broker instead (shared with every process on the host):

    KEYMESH_POOL=openai gunicorn -c examples/gunicorn/gunicorn.conf.py app:app

The upstream API is $UPSTREAM_URL (default: the mock in mock_provider.py on
127.0.0.1:8099).
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import keymesh

UPSTREAM = os.environ.get("UPSTREAM_URL", "http://127.0.0.1:8099/v1/echo")

if os.environ.get("KEYMESH_POOL"):
    pool = keymesh.SyncKeyPool.connect(os.environ["KEYMESH_POOL"], socket=os.environ.get("KEYMESH_SOCKET"))
else:
    keys = os.environ.get("KEYMESH_EXAMPLE_KEYS", "sk-example-key-aaaa0001,sk-example-key-bbbb0002").split(",")
    pool = keymesh.SyncKeyPool(keys, strategy="least_busy", default_cooldown=5.0, acquire_timeout=10.0)


def call_upstream(key: str, body: bytes) -> tuple[int, bytes]:
    req = urllib.request.Request(UPSTREAM, data=body, method="POST",
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        if e.code == 429:
            retry_after = e.headers.get("Retry-After")
            cooldown = float(retry_after) if retry_after and retry_after.isdigit() else None
            pool.mark_rate_limited(key, cooldown=cooldown)  # ends the lease: lease() reports nothing more
        return e.code, e.read()


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/status":
        body = json.dumps(pool.status(), indent=2).encode()  # secrets are masked
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]
    length = int(environ.get("CONTENT_LENGTH") or 0)
    payload = environ["wsgi.input"].read(length) if length else b"{}"
    try:
        # Released with the measured latency; an exception marks the key failed.
        with pool.lease() as key:
            status, body = call_upstream(key, payload)
    except keymesh.NoAvailableKeyError:
        start_response("503 Service Unavailable", [("Content-Type", "text/plain"), ("Retry-After", "1")])
        return [b"no API key available\n"]
    start_response(f"{status} {'OK' if status == 200 else 'Upstream'}", [("Content-Type", "application/json")])
    return [body]
