"""Several hosts on one machine, for `scripts/demo --hosts N` and
`scripts/bench-mesh`: one local redis-server, N keymesh-brokers (each its own
config, socket, segment, state file and mesh host name h1..hN, one
namespace), the mock provider (scripts/farm/mock_provider.py, in its own
process: it sees every host's calls, so it enforces each key's global
limit), and farms of forked worker processes per host with a demand plan.

Everything started here is stopped by pid and removed by Cluster.cleanup()
(brokers, redis-server, provider, workers, the brokers' segments in
/dev/shm, the temp dir), which the callers run in a `finally`, also on
Ctrl-C or SIGTERM (see install_signals()).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import secrets as secrets_mod
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "client", "python"))
sys.path.insert(0, HERE)

from farm import Caller, kill_and_reap, percentile  # noqa: E402

POOL = "mesh"
NAMESPACE = "keymesh-farm"


class Interrupted(Exception):
    pass


def _on_signal(signo: int, _frame: Any) -> None:
    raise Interrupted(signal.Signals(signo).name)


def install_signals() -> None:
    """Ctrl-C and SIGTERM raise Interrupted in the master, so its `finally` cleans up."""
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


def ignore_signals() -> None:
    """While cleaning up: a second Ctrl-C must not cut the cleanup short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; a stopped process is continued first."""
    if proc is None or proc.poll() is not None:
        return
    for signo in (signal.SIGCONT, signal.SIGTERM):
        try:
            proc.send_signal(signo)
        except ProcessLookupError:
            return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- Redis ------------------------------------------------------------------


class RedisError(Exception):
    pass


class Resp:
    """A minimal RESP2 client over one TCP connection: enough for PING, SCRIPT
    LOAD, EVALSHA and DEL (so the scripts need no Python package beyond
    Debian's python3)."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile = self.sock.makefile("rb")

    def call(self, *args: Any) -> Any:
        parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        out = [b"*%d\r\n" % len(parts)]
        for p in parts:
            out.append(b"$%d\r\n%s\r\n" % (len(p), p))
        self.sock.sendall(b"".join(out))
        return self._read()

    def _read(self) -> Any:
        line = self.rfile.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.rfile.read(n + 2)
            if len(data) != n + 2:
                raise ConnectionError("redis closed the connection")
            return data[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise RedisError(f"unexpected reply {line[:40]!r}")

    def close(self) -> None:
        try:
            self.rfile.close()
            self.sock.close()
        except OSError:
            pass


class RedisServer:
    """A throwaway redis-server on a free loopback port, in its own directory,
    without persistence; stopped by pid."""

    def __init__(self, tmp: str) -> None:
        self.dir = os.path.join(tmp, "redis")
        os.makedirs(self.dir, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.frozen = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if shutil.which("redis-server") is None:
            raise SystemExit("mesh: redis-server is missing; run scripts/setup (it installs it)")
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--logfile", os.path.join(self.dir, "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.call("PING", timeout=1) == "PONG":
                    return
            except (OSError, RedisError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("mesh: redis-server did not start (see its log in " + self.dir + ")")
            time.sleep(0.02)  # waiting for it to accept connections, bounded by the deadline

    def call(self, *args: Any, timeout: float = 5.0) -> Any:
        """One command on a connection of its own."""
        r = Resp(self.port, timeout=timeout)
        try:
            return r.call(*args)
        finally:
            r.close()

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.frozen = False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.frozen = False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        stop_process(self.proc, timeout=5)
        self.frozen = False


# --- the hosts ----------------------------------------------------------------


@dataclass
class Host:
    name: str
    workers: int
    dir: str = ""
    sock: str = ""
    log_path: str = ""
    proc: subprocess.Popen | None = None
    segment: str | None = None


@dataclass
class KeySpec:
    name: str
    rpm: int
    revoked: bool = False


class Cluster:
    """The provider, the redis-server and N brokers of one run."""

    def __init__(self, build: str, keys: list[KeySpec], workers: list[int], *, concurrency: int = 4,
                 max_failures: int = 3, latency_ms: float = 20.0, prefix: str = "keymesh-mesh-") -> None:
        self.bin = os.path.join(build, "bin")
        self.tmp = tempfile.mkdtemp(prefix=prefix)
        self.keys = keys
        self.hosts = [Host(f"h{i + 1}", n) for i, n in enumerate(workers)]
        self.concurrency = concurrency
        self.max_failures = max_failures
        self.latency_ms = latency_ms
        # Random secrets for this run only; never printed.
        self.secrets = {k.name: f"sk-mesh-{k.name}-{secrets_mod.token_hex(12)}" for k in keys}
        self.redis = RedisServer(self.tmp)
        self.provider: subprocess.Popen | None = None
        self.port = 0
        self.workers: list[int] = []  # pids of live worker processes (run_farm)
        self.segments: set[str] = set()
        self.runs = 0

    # --- provider ---

    def start_provider(self) -> int:
        cfg = {"port": 0, "latency_ms": self.latency_ms, "jitter_ms": self.latency_ms / 4,
               "keys": {self.secrets[k.name]: {"rpm": k.rpm, "max_concurrency": self.concurrency,
                                               "revoked": k.revoked} for k in self.keys}}
        path = os.path.join(self.tmp, "provider.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(cfg, f)
        self.provider = subprocess.Popen([sys.executable, os.path.join(HERE, "mock_provider.py"), path],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                         start_new_session=True)
        line = self.provider.stdout.readline() if self.provider.stdout else ""
        m = re.match(r"listening (\d+)", line)
        if not m:
            raise SystemExit("mesh: the mock provider did not start")
        self.port = int(m.group(1))
        return self.port

    def provider_request(self, method: str, path: str) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request(method, path, body=b"" if method == "POST" else None)
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def provider_stats(self) -> dict[str, Any]:
        return self.provider_request("GET", "/stats")

    def provider_reset(self) -> None:
        self.provider_request("POST", "/reset")

    def capacity_per_second(self) -> float:
        return float(sum(max(1, k.rpm // 60) for k in self.keys if not k.revoked and k.rpm > 0))

    # --- brokers ---

    def env_name(self, key: str) -> str:
        return "MESH_KEY_" + re.sub(r"[^A-Za-z0-9]", "_", key).upper()

    def start_brokers(self, mesh: dict[str, Any] | None, mesh_hosts: set[str] | None = None) -> None:
        """Starts every host's broker, with `mesh` (the config object, without
        `redis` and `host`, which are filled in; only on the hosts named in
        `mesh_hosts` when given) or without a mesh."""
        self.runs += 1
        env = dict(os.environ)
        for name, secret in self.secrets.items():
            env[self.env_name(name)] = secret
        for h in self.hosts:
            h.dir = os.path.join(self.tmp, f"run{self.runs}-{h.name}")
            os.makedirs(h.dir)
            h.sock = os.path.join(h.dir, "km.sock")
            config: dict[str, Any] = {
                "socket": h.sock,
                "state_file": os.path.join(h.dir, "state.json"),
                "pools": {POOL: {
                    "strategy": "least_busy", "default_cooldown": 1, "max_failures": self.max_failures,
                    "acquire_timeout": 10,
                    "keys": [{"name": k.name, "secret_env": self.env_name(k.name), "rpm": k.rpm,
                              "max_concurrency": self.concurrency} for k in self.keys],
                }},
            }
            if mesh is not None and (mesh_hosts is None or h.name in mesh_hosts):
                config["mesh"] = {"redis": self.redis.url, "host": h.name, **mesh}
            path = os.path.join(h.dir, "keymesh.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2)
            h.log_path = os.path.join(h.dir, "broker.log")
            with open(h.log_path, "w", encoding="utf-8") as log:
                h.proc = subprocess.Popen([os.path.join(self.bin, "keymesh-broker"), "--config", path],
                                          env=env, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 15
        for h in self.hosts:
            while True:
                text = self.log(h)
                m = re.search(r"event=ready .*segment=(\S+)", text)
                if m:
                    h.segment = m.group(1)
                    self.segments.add(h.segment)
                    break
                if h.proc is None or h.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"mesh: keymesh-broker of {h.name} did not start:\n{text[-3000:]}")
                time.sleep(0.02)  # waiting for its ready line, bounded by the deadline

    def log(self, h: Host) -> str:
        try:
            with open(h.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop_brokers(self) -> None:
        for h in self.hosts:
            if h.proc is not None and h.proc.poll() is None:
                h.proc.send_signal(signal.SIGTERM)
        for h in self.hosts:
            stop_process(h.proc)
            h.proc = None
            self._unlink_segment(self._segment_of(h))
            h.segment = None

    def _segment_of(self, h: Host) -> str | None:
        """The segment's name: from the broker's ready line, else from the file
        the broker keeps beside its socket (a broker that never logged ready)."""
        if h.segment:
            return h.segment
        try:
            with open(h.sock + ".segment", encoding="utf-8") as f:
                return f.read().strip() or None
        except (OSError, UnicodeDecodeError):
            return None

    def _unlink_segment(self, name: str | None) -> None:
        if name and re.fullmatch(r"keymesh-[0-9a-f]{32}", name):
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except FileNotFoundError:
                pass

    def ctl(self, h: Host, *args: str, timeout: float = 15) -> subprocess.CompletedProcess:
        return subprocess.run([os.path.join(self.bin, "keymeshctl"), "--socket", h.sock, *args],
                              capture_output=True, text=True, timeout=timeout)

    def mesh_status(self, h: Host) -> dict[str, Any] | None:
        """`keymeshctl mesh --json` (the `mesh` object), None when it failed."""
        r = self.ctl(h, "mesh", "--json", timeout=5)
        if r.returncode != 0:
            return None
        try:
            obj = json.loads(r.stdout)
        except ValueError:
            return None
        if isinstance(obj, dict) and isinstance(obj.get("mesh"), dict):
            obj = obj["mesh"]
        return obj if isinstance(obj, dict) else None

    def pool_status(self, h: Host) -> dict[str, Any]:
        r = self.ctl(h, "status", POOL, "--json")
        if r.returncode != 0:
            raise SystemExit(f"mesh: keymeshctl status on {h.name} failed: {r.stderr.strip()}")
        obj = json.loads(r.stdout)
        return obj[0] if isinstance(obj, list) else obj

    def wait_mesh(self, timeout: float, modes: tuple[str, ...] = ("leased",),
                  hosts: list[Host] | None = None) -> dict[str, str]:
        """Waits until every host's mesh mode is in `modes` and each host holds
        a share of every healthy key; returns each host's mode at the end."""
        deadline = time.monotonic() + timeout
        while True:
            modes_now: dict[str, str] = {}
            ready = True
            for h in hosts if hosts is not None else self.hosts:
                st = self.mesh_status(h)
                mode = str(st.get("mode")) if st else "?"
                modes_now[h.name] = mode
                if mode not in modes:
                    ready = False
            if ready or time.monotonic() > deadline:
                return modes_now
            time.sleep(0.2)  # polling keymeshctl, bounded by the deadline

    def cleanup(self) -> None:
        kill_and_reap(self.workers, signal.SIGKILL)
        self.workers = []
        for h in self.hosts:
            if h.proc is not None and h.proc.poll() is None:
                h.proc.send_signal(signal.SIGTERM)
        for h in self.hosts:
            stop_process(h.proc)
            h.proc = None
            self._unlink_segment(self._segment_of(h))
        for name in self.segments:
            self._unlink_segment(name)
        self.redis.stop()
        stop_process(self.provider)
        shutil.rmtree(self.tmp, ignore_errors=True)


# --- the workers ----------------------------------------------------------------

# The Lua GCRA of the Redis-per-request contender: one call per acquire over
# all keys; grants the first key (from a rotating start) whose theoretical
# arrival time allows a request now, else answers how long to wait.
#   KEYS: one TAT (microseconds, Redis time) per API key
#   ARGV: emission interval (us), burst tolerance (us), first key to try (1-based)
#   -> {index (1-based) or 0, microseconds to wait when 0}
GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local first = tonumber(ARGV[3])
local n = #KEYS
local best = -1
for j = 0, n - 1 do
  local i = (first - 1 + j) % n + 1
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
  if tat < now then tat = now end
  local wait = tat - tolerance - now
  if wait <= 0 then
    local new = tat + interval
    redis.call('SET', KEYS[i], string.format('%d', new), 'PX', math.ceil((new - now) / 1000) + 1000)
    return {i, 0}
  end
  if best < 0 or wait < best then best = wait end
end
return {0, math.ceil(best)}
"""


@dataclass
class Gcra:
    """What a Redis-per-request worker needs: the server, the script, the keys."""
    port: int
    sha: str
    tat_keys: list[str]
    secrets: list[str]
    interval_us: int
    tolerance_us: int

    @staticmethod
    def load(port: int, secrets: list[str], rpm: int, rate_margin: float = 0.02) -> "Gcra":
        r = Resp(port)
        try:
            sha = r.call("SCRIPT", "LOAD", GCRA_LUA).decode()
            keys = [f"{NAMESPACE}:gcra:{i}" for i in range(len(secrets))]
            r.call("DEL", *keys)
        finally:
            r.close()
        interval = int(round(60e6 / (rpm * (1 - rate_margin))))
        return Gcra(port, sha, keys, secrets, interval, 0)


@dataclass
class Phase:
    start: float  # seconds after the farm starts
    rate: float   # requests per second this worker offers; 0: as fast as it gets keys


@dataclass
class WorkerPlan:
    host: int
    phases: list[Phase] = field(default_factory=lambda: [Phase(0.0, 0.0)])


def _phase_at(phases: list[Phase], t: float) -> int:
    i = 0
    for j, p in enumerate(phases):
        if t >= p.start:
            i = j
    return i


def worker(mode: str, plan: WorkerPlan, sock: str, port: int, start: float, until: float,
           gcra: Gcra | None, out_fd: int) -> None:
    """One worker process: at its plan's rate, acquire a key (from its host's
    broker, or from the Lua GCRA in Redis), call the provider, report the
    outcome to the pool. Writes one JSON report to out_fd."""
    import keymesh  # noqa: PLC0415 - after sys.path is set; only in workers

    pool: Any = None
    redis: Resp | None = None
    if mode == "gcra":
        assert gcra is not None
        redis = Resp(gcra.port)
    else:
        pool = keymesh.SyncKeyPool.connect(POOL, socket=sock)
    caller = Caller(port)
    rng = random.Random(os.getpid())
    counts = {"ok": 0, "429": 0, "401": 0, "other": 0, "no_key": 0}
    phase_ok = [0] * len(plan.phases)    # successful calls by the phase they were offered in
    phase_done = [0] * len(plan.phases)  # ... by the phase they completed in
    phase_offered = [0] * len(plan.phases)
    waits: list[float] = []
    next_at = start
    turn = rng.randrange(1 << 16)
    while True:
        now = time.monotonic()
        if now >= until:
            break
        phase = _phase_at(plan.phases, now - start)
        rate = plan.phases[phase].rate
        if rate > 0:
            if next_at > now:
                time.sleep(min(next_at, until) - now)  # the worker's own demand schedule
                continue
            # Offered load: one request per 1/rate; when served late, catch up at
            # most two seconds' worth (demand queues, but not forever).
            next_at = max(next_at + 1.0 / rate, now - 2.0)
        phase_offered[phase] += 1
        t0 = time.monotonic()
        key: str | None = None
        if mode == "gcra":
            assert redis is not None and gcra is not None
            while key is None and time.monotonic() < until:
                turn += 1
                idx, wait_us = redis.call("EVALSHA", gcra.sha, len(gcra.tat_keys), *gcra.tat_keys,
                                          gcra.interval_us, gcra.tolerance_us, turn % len(gcra.tat_keys) + 1)
                if idx:
                    key = gcra.secrets[int(idx) - 1]
                else:
                    time.sleep(min(int(wait_us) / 1e6, max(0.0, until - time.monotonic())))
            if key is None:
                continue  # the run ended while it waited: not a key that did not come
        else:
            try:
                key = pool.acquire(timeout=max(0.01, min(5.0, until - time.monotonic())))
            except keymesh.NoAvailableKeyError:
                # A wait the run's end cut short is not a key that did not come
                # (every worker still waiting then would count one).
                if time.monotonic() < until:
                    counts["no_key"] += 1
                continue
        t1 = time.monotonic()
        waits.append(t1 - t0)
        status, retry_after, tokens = caller.call(key)
        latency = time.monotonic() - t1
        if status == 200:
            counts["ok"] += 1
            phase_ok[phase] += 1
            phase_done[_phase_at(plan.phases, time.monotonic() - start)] += 1
            if pool is not None:
                pool.release(key, latency=latency, tokens=tokens)
        elif status == 429:
            counts["429"] += 1
            if pool is not None:
                pool.mark_rate_limited(key, cooldown=retry_after)
        else:
            counts["401" if status == 401 else "other"] += 1
            if pool is not None:
                try:
                    # 401: revoked (out until reset); others count towards the circuit.
                    pool.mark_failed(key, permanent=status == 401)
                except keymesh.KeyExhaustedError:
                    pass  # this failure took the key out of rotation
    if len(waits) > 20000:
        waits = rng.sample(waits, 20000)
    report = {"host": plan.host, "counts": counts, "phase_ok": phase_ok, "phase_done": phase_done,
              "phase_offered": phase_offered,
              "waits": waits}
    data = (json.dumps(report) + "\n").encode()
    while data:
        data = data[os.write(out_fd, data):]
    os.close(out_fd)
    if pool is not None:
        pool.close()
    if redis is not None:
        redis.close()


@dataclass
class FarmResult:
    reports: list[dict[str, Any]]
    elapsed: float
    failed: int


def run_farm(cluster: Cluster, mode: str, seconds: float, plans: list[WorkerPlan],
             events: list[tuple[float, Callable[[float], None]]] | None = None,
             gcra: Gcra | None = None) -> FarmResult:
    """Forks one process per plan, runs them for `seconds`, and calls each
    event (t, fn(t)) at time t of the run from the master meanwhile (the
    display, a Redis freeze). Returns the workers' reports."""
    lead = 0.3  # the forks' head start, so that every worker begins together
    start = time.monotonic() + lead
    until = start + seconds
    pipes = []
    for plan in plans:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # worker
            os.close(r)
            code = 0
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)   # the master stops us
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                h = cluster.hosts[plan.host]
                worker(mode, plan, h.sock, cluster.port, start, until, gcra, w)
            except BaseException:  # noqa: BLE001 - a worker never returns into the master's code
                import traceback  # noqa: PLC0415
                traceback.print_exc()
                code = 1
            os._exit(code)
        os.close(w)
        pipes.append(r)
        cluster.workers.append(pid)
    pending = sorted(events or [], key=lambda e: e[0])
    for t, fn in pending:
        delay = start + t - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # the run's own schedule (display, faults), not a synchronisation
        fn(time.monotonic() - start)
    reports = []
    for r in pipes:
        with os.fdopen(r, "rb") as f:
            data = f.read()
        if data:
            reports.append(json.loads(data))
    failed = 0
    for pid in list(cluster.workers):
        _, status = os.waitpid(pid, 0)
        cluster.workers.remove(pid)
        if status != 0:
            failed += 1
    return FarmResult(reports, time.monotonic() - start, failed)


def totals(reports: list[dict[str, Any]]) -> dict[str, int]:
    counts = {"ok": 0, "429": 0, "401": 0, "other": 0, "no_key": 0}
    for rep in reports:
        for k, v in rep["counts"].items():
            counts[k] += v
    return counts


def per_host(reports: list[dict[str, Any]], hosts: int, field_name: str = "phase_ok") -> list[list[int]]:
    """Per host, per phase: the sum of `field_name` over its workers."""
    out: list[list[int]] = [[] for _ in range(hosts)]
    for rep in reports:
        row = out[rep["host"]]
        vals = rep[field_name]
        while len(row) < len(vals):
            row.append(0)
        for i, v in enumerate(vals):
            row[i] += v
    return out


def wait_percentiles(reports: list[dict[str, Any]]) -> tuple[float, float]:
    waits: list[float] = []
    for rep in reports:
        waits.extend(rep["waits"])
    return percentile(waits, 0.5), percentile(waits, 0.99)


def check_binaries(build: str) -> str | None:
    for tool in ("keymesh-broker", "keymeshctl"):
        if not os.access(os.path.join(build, "bin", tool), os.X_OK):
            return f"{build}/bin/{tool} is missing; run scripts/setup first"
    return None
