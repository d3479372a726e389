"""The farm benchmark: a pre-fork farm of worker processes calling a mock
provider through KeyMesh, beside two baselines, in one run.

Modes (each runs for --seconds with the same demand):
  keymesh      one keymesh-broker; the pool is created in the master before
               fork (gunicorn --preload style) and shared by every worker
  random       each request picks a random key; 429s are simply counted
  per-process  each worker owns an original-style in-process pool that cools
               a key down after a 429 (what the original gives each process)

Prints, per mode: successful calls / provider capacity over the run, the
share of provider calls refused (429), 401s, and p50/p99 wait for a key.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "client", "python"))
sys.path.insert(0, HERE)

import mock_provider  # noqa: E402
from original_pool import OriginalPool  # noqa: E402


def kill_and_reap(pids: list[int], sig: int) -> None:
    """Sends `sig` to every worker in `pids` (gone ones skipped), then waits
    for each (already reaped ones skipped)."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    for pid in pids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))]


class Caller:
    """One keep-alive HTTP connection to the mock provider."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def call(self, key: str, extra: dict[str, str] | None = None) -> tuple[int, float | None, int]:
        """(status, Retry-After or None, tokens); status 0 when the call failed.
        `extra`: more request headers (the mock provider's test hooks)."""
        try:
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", **(extra or {})}
            self.conn.request("POST", "/v1/chat/completions", body=b"{}", headers=headers)
            resp = self.conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            return 0, None, 0
        retry = resp.getheader("Retry-After")
        tokens = 0
        if resp.status == 200:
            try:
                tokens = int(json.loads(body)["usage"]["total_tokens"])
            except (ValueError, KeyError):
                tokens = 0
        return resp.status, (float(retry) if retry else None), tokens


def worker(mode: str, pool: Any, keys: list[str], port: int, until: float, out_fd: int) -> None:
    caller = Caller(port)
    rng = random.Random(os.getpid())
    waits: list[float] = []
    counts = {"ok": 0, "429": 0, "401": 0, "other": 0, "no_key": 0}
    while time.monotonic() < until:
        t0 = time.monotonic()
        try:
            if mode == "random":
                key = rng.choice(keys)
            else:
                key = pool.acquire()
        except Exception:  # noqa: BLE001 - counted, the farm goes on
            counts["no_key"] += 1
            continue
        t1 = time.monotonic()
        waits.append(t1 - t0)
        status, retry_after, tokens = caller.call(key)
        latency = time.monotonic() - t1
        if status == 200:
            counts["ok"] += 1
            if mode == "keymesh":
                pool.release(key, latency=latency, tokens=tokens)
            elif mode == "per-process":
                pool.release(key, latency=latency)
        elif status == 429:
            counts["429"] += 1
            if mode != "random":
                pool.mark_rate_limited(key, cooldown=retry_after)
        elif status == 401:
            counts["401"] += 1
            if mode == "keymesh":
                try:
                    pool.mark_failed(key, permanent=True)
                except TypeError:
                    pool.mark_failed(key)
                except Exception:  # noqa: BLE001 - KeyExhaustedError once
                    pass
            elif mode == "per-process":
                pool.mark_failed(key)
        else:
            counts["other"] += 1
            if mode == "keymesh":
                try:
                    pool.mark_failed(key)
                except Exception:  # noqa: BLE001
                    pass
            elif mode == "per-process":
                pool.mark_failed(key)
    # Keep the report small: a sample of waits is enough for percentiles.
    if len(waits) > 20000:
        waits = rng.sample(waits, 20000)
    os.write(out_fd, (json.dumps({"counts": counts, "waits": waits}) + "\n").encode())
    os.close(out_fd)


def run_mode(mode: str, args: argparse.Namespace, secrets: list[str], port: int, provider: Any,
             socket_path: str | None) -> dict[str, Any]:
    reset = http.client.HTTPConnection("127.0.0.1", port)
    reset.request("POST", "/reset", body=b"")
    reset.getresponse().read()
    pool: Any = None
    if mode == "keymesh":
        import keymesh  # noqa: PLC0415 - only this mode needs the library

        pool = keymesh.SyncKeyPool.connect("farm", socket=socket_path)
    start = time.monotonic()
    until = start + args.seconds
    pipes = []
    pids = []
    for _ in range(args.workers):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                wpool = pool
                if mode == "per-process":
                    wpool = OriginalPool(secrets, default_cooldown=1.0, max_failures=args.max_failures,
                                         acquire_timeout=60.0)
                worker(mode, wpool, secrets, port, until, w)
            finally:
                os._exit(0)
        os.close(w)
        pipes.append(r)
        pids.append(pid)
    reports = []
    for r in pipes:
        with os.fdopen(r) as f:
            line = f.read()
        if line:
            reports.append(json.loads(line))
    for pid in pids:
        os.waitpid(pid, 0)
    elapsed = time.monotonic() - start
    stats = provider.stats()
    if pool is not None:
        pool.close()
    counts = {"ok": 0, "429": 0, "401": 0, "other": 0, "no_key": 0}
    waits: list[float] = []
    for rep in reports:
        for k, v in rep["counts"].items():
            counts[k] += v
        waits.extend(rep["waits"])
    per_second = sum(k["per_second"] for k in stats["keys"].values() if not k["revoked"])
    capacity = per_second * elapsed
    calls = counts["ok"] + counts["429"] + counts["401"] + counts["other"]
    return {
        "mode": mode, "ok": counts["ok"], "capacity": capacity, "share": counts["ok"] / capacity if capacity else 0,
        "calls": calls, "refused": counts["429"] / calls if calls else 0, "401": counts["401"],
        "p50": percentile(waits, 0.5), "p99": percentile(waits, 0.99), "no_key": counts["no_key"],
    }


def start_broker(args: argparse.Namespace, secrets: list[str], rpms: list[int], tmp: str) -> tuple[subprocess.Popen, str]:
    sock = os.path.join(tmp, "km.sock")
    keys = []
    for i, (secret, rpm) in enumerate(zip(secrets, rpms)):
        keys.append({"name": f"key-{i}", "secret_env": f"FARM_KEY_{i}", "rpm": rpm,
                     "max_concurrency": args.concurrency})
    config = {
        "socket": sock,
        "state_file": os.path.join(tmp, "state.json"),
        "pools": {"farm": {"strategy": "least_busy", "default_cooldown": 1.0, "max_failures": args.max_failures,
                           "acquire_timeout": 60, "keys": keys}},
    }
    cfg_path = os.path.join(tmp, "broker.json")
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    env = dict(os.environ)
    for i, secret in enumerate(secrets):
        env[f"FARM_KEY_{i}"] = secret
    broker = subprocess.Popen([os.path.join(args.build, "bin", "keymesh-broker"), "--config", cfg_path,
                               "--log-level", "warn"], env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        if broker.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("farm: keymesh-broker did not start")
        time.sleep(0.01)
    return broker, sock


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--keys", type=int, default=4, help="healthy keys (one more is revoked)")
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=4, help="provider's per-key concurrency limit")
    parser.add_argument("--max-failures", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--modes", default="keymesh,random,per-process")
    parser.add_argument("--build", default=os.path.join(ROOT, "build"))
    args = parser.parse_args()

    rng = random.Random(7)
    secrets = [f"sk-farm-{i}-" + "".join(rng.choice("abcdef0123456789") for _ in range(24)) for i in range(args.keys)]
    revoked = "sk-farm-revoked-" + "".join(rng.choice("abcdef0123456789") for _ in range(24))
    all_keys = secrets + [revoked]
    rpms = [args.rpm] * len(all_keys)
    server, provider = mock_provider.serve({
        "latency_ms": args.latency_ms, "jitter_ms": args.latency_ms / 4,
        "keys": {s: {"rpm": r, "max_concurrency": args.concurrency, "revoked": s == revoked}
                 for s, r in zip(all_keys, rpms)},
    })
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]

    print(f"farm: {args.workers} worker processes, {args.keys} keys x {args.rpm} rpm (quantized per second) "
          f"+ 1 revoked key, provider latency {args.latency_ms:.0f} ms, {args.seconds:.0f} s per mode")
    results = []
    with tempfile.TemporaryDirectory(prefix="keymesh-farm-") as tmp:
        broker = None
        try:
            for mode in args.modes.split(","):
                sock = None
                if mode == "keymesh":
                    broker, sock = start_broker(args, all_keys, rpms, tmp)
                results.append(run_mode(mode, args, all_keys, port, provider, sock))
                if broker is not None:
                    broker.send_signal(signal.SIGTERM)
                    broker.wait(timeout=10)
                    broker = None
        finally:
            if broker is not None:
                broker.kill()
            server.shutdown()

    print()
    print(f"{'mode':<12} {'ok calls':>9} {'capacity':>9} {'ok/cap':>7} {'calls':>7} {'429 share':>9} "
          f"{'401s':>5} {'wait p50':>9} {'wait p99':>9}")
    for r in results:
        print(f"{r['mode']:<12} {r['ok']:>9} {r['capacity']:>9.0f} {r['share']:>7.3f} {r['calls']:>7} "
              f"{r['refused'] * 100:>8.2f}% {r['401']:>5} {r['p50'] * 1000:>7.1f}ms {r['p99'] * 1000:>7.1f}ms")
    print("\ntargets (keymesh): ok/cap >= 0.97, 429 share <= 0.5%, 401s <= max_failures "
          f"({args.max_failures}) + calls in flight when the circuit opened")
    return 0


if __name__ == "__main__":
    sys.exit(main())
