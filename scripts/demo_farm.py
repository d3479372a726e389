"""KeyMesh's main job, end to end, on an embedded default config.

Starts keymesh-broker (config, socket, state and metrics file in a temp dir;
secrets passed through environment variables), a local mock LLM provider that
enforces per-key rate limits and refuses one revoked key with 401, and a
pre-fork farm of Python worker processes that share the broker's pool (the
pool is connected in the master before fork, as gunicorn --preload does).
Shows `keymeshctl status` while they run and ends with a summary and an
accounting check. Everything it started (workers, broker, provider, the
broker's shared-memory segment, the temp dir) is removed on exit, also on
Ctrl-C or SIGTERM.

Usage: python3 scripts/demo_farm.py [--workers 6] [--seconds 10] [--build build]
       python3 scripts/demo_farm.py --hosts 3 [--seconds 30]   (several hosts:
       scripts/farm/mesh_demo.py)
Exit 0 when the accounting check passes.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import secrets as secrets_mod
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "client", "python"))
sys.path.insert(0, os.path.join(HERE, "farm"))

from farm import kill_and_reap  # noqa: E402

POOL = "demo"
# name -> (rpm, revoked): four healthy keys and one the provider refuses.
KEYS = {"team-a": (600, False), "team-b": (600, False), "team-c": (300, False), "team-d": (300, False),
        "old-key": (600, True)}
CONCURRENCY = 4
MAX_FAILURES = 3


class Interrupted(Exception):
    pass


def on_signal(signo: int, _frame: Any) -> None:
    raise Interrupted(signal.Signals(signo).name)


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="keymesh-demo-")
        self.sock = os.path.join(self.tmp, "km.sock")
        self.broker: subprocess.Popen | None = None
        self.provider: subprocess.Popen | None = None
        self.segment: str | None = None
        self.workers: list[int] = []
        self.pool: Any = None
        self.bin = os.path.join(args.build, "bin")
        # Random secrets for this run only; shown masked, like every output.
        self.secrets = {name: f"sk-demo-{name}-{secrets_mod.token_hex(12)}" for name in KEYS}

    # --- processes ---------------------------------------------------------

    def start_provider(self) -> int:
        cfg = {"port": 0, "latency_ms": 20, "jitter_ms": 5,
               "keys": {self.secrets[n]: {"rpm": rpm, "max_concurrency": CONCURRENCY, "revoked": revoked}
                        for n, (rpm, revoked) in KEYS.items()}}
        path = os.path.join(self.tmp, "provider.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(cfg, f)
        self.provider = subprocess.Popen([sys.executable, os.path.join(HERE, "farm", "mock_provider.py"), path],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                         start_new_session=True)
        line = self.provider.stdout.readline() if self.provider.stdout else ""
        m = re.match(r"listening (\d+)", line)
        if not m:
            raise SystemExit("demo: the mock provider did not start")
        return int(m.group(1))

    def start_broker(self) -> None:
        config = {
            "socket": self.sock,
            "state_file": os.path.join(self.tmp, "state.json"),
            "metrics_file": os.path.join(self.tmp, "keymesh.prom"),
            "metrics_interval": 1,
            "pools": {POOL: {
                "strategy": "least_busy", "default_cooldown": 1, "max_failures": MAX_FAILURES,
                "acquire_timeout": 10,
                "keys": [{"name": n, "secret_env": "DEMO_KEY_" + n.upper().replace("-", "_"), "rpm": rpm,
                          "max_concurrency": CONCURRENCY} for n, (rpm, _) in KEYS.items()],
            }},
        }
        path = os.path.join(self.tmp, "keymesh.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        env = dict(os.environ)
        for n in KEYS:
            env["DEMO_KEY_" + n.upper().replace("-", "_")] = self.secrets[n]
        self.log_path = os.path.join(self.tmp, "broker.log")
        log = open(self.log_path, "w", encoding="utf-8")
        self.broker = subprocess.Popen([os.path.join(self.bin, "keymesh-broker"), "--config", path],
                                       env=env, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 10
        while True:
            with open(self.log_path, encoding="utf-8") as f:
                text = f.read()
            m = re.search(r"event=ready .*segment=(\S+)", text)
            if m:
                self.segment = m.group(1)
                break
            if self.broker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("demo: keymesh-broker did not start:\n" + text)
            time.sleep(0.02)  # waiting for its ready line, bounded by the deadline
        print(f"demo: keymesh-broker pid {self.broker.pid}, socket {self.sock}, segment /dev/shm/{self.segment}")

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([os.path.join(self.bin, "keymeshctl"), "--socket", self.sock, *args],
                              capture_output=True, text=True, timeout=15)

    def run_workers(self, port: int) -> list[dict[str, int]]:
        import keymesh  # noqa: PLC0415 - after sys.path is set

        self.pool = keymesh.SyncKeyPool.connect(POOL, socket=self.sock)
        until = time.monotonic() + self.args.seconds
        pipes = []
        for i in range(self.args.workers):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # worker
                os.close(r)
                code = 0
                try:
                    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the master stops us
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    counts = worker(self.pool, port, until, keymesh)
                    os.write(w, json.dumps(counts).encode())
                except BaseException:  # noqa: BLE001 - a worker never returns into the master's code
                    code = 1
                os._exit(code)
            os.close(w)
            pipes.append(r)
            self.workers.append(pid)
        print(f"demo: {self.args.workers} worker processes for {self.args.seconds:.0f} s "
              f"({len(KEYS) - 1} keys x rpm limits + 1 revoked key, mock provider on port {port})\n")
        shows = max(1, int(self.args.seconds // 3))
        for n in range(shows):
            time.sleep(self.args.seconds / (shows + 1))  # the pace of the display, not a synchronisation
            st = self.ctl("status", POOL)
            print(f"--- keymeshctl status   (t = {self.args.seconds - (until - time.monotonic()):.0f} s)")
            print(st.stdout if st.returncode == 0 else st.stderr)
        reports = []
        for r in pipes:
            with os.fdopen(r, "rb") as f:
                data = f.read()
            if data:
                reports.append(json.loads(data))
        for pid in self.workers:
            _, status = os.waitpid(pid, 0)
            if status != 0:
                print(f"demo: worker {pid} failed (status {status})")
        self.workers = []
        return reports

    def cleanup(self) -> None:
        kill_and_reap(self.workers, signal.SIGTERM)
        self.workers = []
        if self.pool is not None:
            try:
                self.pool.close()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        for proc in (self.broker, self.provider):
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.segment:
            try:
                os.unlink(os.path.join("/dev/shm", self.segment))
            except FileNotFoundError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    # --- the job -----------------------------------------------------------

    def run(self) -> int:
        port = self.start_provider()
        self.start_broker()
        reports = self.run_workers(port)
        return self.summary(reports, port)

    def summary(self, reports: list[dict[str, int]], port: int) -> int:
        counts = {"ok": 0, "429": 0, "401": 0, "other": 0, "no_key": 0}
        for rep in reports:
            for k, v in rep.items():
                counts[k] += v
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/stats")
        provider = json.loads(conn.getresponse().read())
        st = self.ctl("status", POOL, "--json")
        pool = json.loads(st.stdout)[0]
        m = pool["pool_metrics"]
        keys = {k["name"]: k for k in pool["keys"]}
        print("--- keymeshctl status   (final)")
        print(self.ctl("status", POOL).stdout)
        metrics = self.ctl("metrics").stdout.splitlines()
        print("--- keymeshctl metrics  (excerpt)")
        for line in metrics:
            if line.startswith(("keymesh_pool_acquires_total", "keymesh_pool_rate_limited_total",
                                "keymesh_pool_eligible_keys", "keymesh_acquire_wait_seconds_count")):
                print(line)
        calls = counts["ok"] + counts["429"] + counts["401"] + counts["other"]
        capacity = sum(rpm // 60 for rpm, revoked in KEYS.values() if not revoked) * self.args.seconds
        revoked = keys["old-key"]
        provider_ok = sum(k["ok"] for k in provider["keys"].values())
        print("\n--- summary")
        print(f"requests {calls} from {len(reports)} workers: {counts['ok']} succeeded "
              f"({counts['ok'] / self.args.seconds:.1f}/s against a provider capacity of about "
              f"{capacity / self.args.seconds:.0f}/s), {counts['429']} rate-limited (429), "
              f"{counts['401']} refused (401), {counts['no_key']} acquires without a key")
        print(f"revoked key old-key: state {revoked['state']}"
              f"{' (' + revoked['reason'] + ')' if revoked['reason'] else ''}, "
              f"{revoked['acquires']} acquires, out of rotation after {revoked['failure_count']} failures")
        checks = [
            ("successes: workers == broker == provider",
             counts["ok"] == m["total_releases"] == provider_ok, f"{counts['ok']} / {m['total_releases']} / {provider_ok}"),
            ("429s: workers == broker", counts["429"] == m["total_rate_limited"],
             f"{counts['429']} / {m['total_rate_limited']}"),
            ("failures: workers == broker", counts["401"] + counts["other"] == m["total_failures"],
             f"{counts['401'] + counts['other']} / {m['total_failures']}"),
            ("every lease ended: acquires == successes + failures + 429s + cancelled",
             m["total_acquires"] == m["total_releases"] + m["total_failures"] + m["total_rate_limited"]
             + sum(k["cancelled"] for k in keys.values()), f"{m['total_acquires']}"),
            ("nothing in flight", sum(k["active_requests"] for k in keys.values()) == 0, ""),
            ("revoked key out of rotation", revoked["state"] != "available" and not revoked["is_available"],
             revoked["state"]),
            ("401s bounded by max_failures + concurrency", counts["401"] <= MAX_FAILURES + CONCURRENCY,
             str(counts["401"])),
        ]
        ok = True
        for name, passed, detail in checks:
            ok = ok and passed
            print(f"  [{'ok' if passed else 'FAIL'}] {name}{'  (' + detail + ')' if detail else ''}")
        print("demo: " + ("accounting check passed" if ok else "ACCOUNTING CHECK FAILED"))
        return 0 if ok else 1


def worker(pool: Any, port: int, until: float, keymesh: Any) -> dict[str, int]:
    """One worker process: acquire, call the provider, report the outcome."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    counts = {"ok": 0, "429": 0, "401": 0, "other": 0, "no_key": 0}
    while time.monotonic() < until:
        try:
            key = pool.acquire(timeout=max(0.01, until - time.monotonic()))
        except keymesh.NoAvailableKeyError:
            if time.monotonic() < until:  # a wait the demo's end cut short is not a key that did not come
                counts["no_key"] += 1
            continue
        t0 = time.monotonic()
        try:
            conn.request("POST", "/v1/chat/completions", body=b"{}",
                         headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            counts["other"] += 1
            pool.mark_failed(key)
            continue
        latency = time.monotonic() - t0
        if resp.status == 200:
            counts["ok"] += 1
            pool.release(key, latency=latency, tokens=int(json.loads(body)["usage"]["total_tokens"]))
        elif resp.status == 429:
            counts["429"] += 1
            retry = resp.getheader("Retry-After")
            pool.mark_rate_limited(key, cooldown=float(retry) if retry else None)
        else:
            counts["401" if resp.status == 401 else "other"] += 1
            try:
                # 401: the key is revoked (out until reset); other errors count
                # towards the circuit breaker.
                pool.mark_failed(key, permanent=resp.status == 401)
            except keymesh.KeyExhaustedError:
                pass  # this failure took the key out of rotation
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=None, help="default 10, or 30 with --hosts")
    parser.add_argument("--build", default=os.path.join(ROOT, "build"), help="build directory (bin/, lib/)")
    parser.add_argument("--hosts", type=int, default=1,
                        help="N >= 2: N brokers sharing the keys through a local redis-server (the mesh); "
                             "--workers is then ignored (4, 2, 1, ... per host)")
    parser.add_argument("--refresh", type=float, default=1.0, help="with --hosts: the mesh's refresh (s)")
    parser.add_argument("--lease", type=float, default=6.0,
                        help="with --hosts: the mesh's lease (s; a new Redis starts learning for one lease)")
    args = parser.parse_args()
    args.build = os.path.abspath(args.build)
    if args.hosts > 1:
        if args.hosts > 8:
            parser.error("--hosts: at most 8 on one machine")
        args.seconds = 30.0 if args.seconds is None else args.seconds
        import mesh_demo  # noqa: PLC0415 - only the mesh demo needs it

        return mesh_demo.main(args)
    if args.hosts < 1:
        parser.error("--hosts must be at least 1")
    args.seconds = 10.0 if args.seconds is None else args.seconds
    os.environ.setdefault("KEYMESH_LIB", os.path.join(args.build, "lib", "libkeymesh.so"))
    for tool in ("keymesh-broker", "keymeshctl"):
        if not os.access(os.path.join(args.build, "bin", tool), os.X_OK):
            print(f"demo: {args.build}/bin/{tool} is missing; run scripts/setup first", file=sys.stderr)
            return 2
    demo = Demo(args)
    master = os.getpid()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return demo.run()
    except Interrupted as e:
        print(f"\ndemo: interrupted ({e}); cleaning up", file=sys.stderr)
        return 130
    finally:
        if os.getpid() == master:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            demo.cleanup()


if __name__ == "__main__":
    sys.exit(main())
