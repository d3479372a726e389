"""Fixtures: pools in both modes.

``make_pool(keys, **options)`` builds an embedded SyncKeyPool, or, for the
``attached`` mode, starts the real keymesh-broker ($KEYMESH_BROKER, else
build/bin/keymesh-broker) with a temporary config holding those keys and
connects to it. Attached tests fail when the broker is not built.

``asyncio_debug`` (a fixture; ``pytestmark = pytest.mark.usefixtures("asyncio_debug")``
applies it to a module) runs every event loop the test creates in debug mode
with a small slow_callback_duration, and fails the test if asyncio logged a
callback that blocked the loop ("Executing ... took ..."). A test whose loops
run in several threads at once (so a step may wait for the GIL) sets its own
bound with ``@pytest.mark.slow_callback(seconds)``.
"""
from __future__ import annotations

import asyncio
import bisect
import collections
import gc
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Deque, Dict, Iterator, List, Optional, Tuple

import pytest

import keymesh

ROOT = Path(__file__).resolve().parents[2]
BROKER = os.environ.get("KEYMESH_BROKER") or str(ROOT / "build" / "bin" / "keymesh-broker")


def broker_available() -> bool:
    return os.path.isfile(BROKER) and os.access(BROKER, os.X_OK)


def secret(i: int) -> str:
    return f"sk-test-{i:04d}-abcdefghijklmnop{i:04d}"


def key_dicts(keys: List[Any]) -> List[Dict[str, Any]]:
    out = []
    for i, k in enumerate(keys):
        if isinstance(k, str):
            out.append({"name": f"key-{i + 1}", "secret": k})
        elif isinstance(k, tuple):
            out.append({"name": k[0], "secret": k[1]})
        else:
            d = dict(k)
            d.setdefault("name", f"key-{i + 1}")
            out.append(d)
    return out


class Broker:
    """A keymesh-broker process with a temporary config, socket and state."""

    def __init__(self, keys: List[Any], options: Dict[str, Any]) -> None:
        self.dir = tempfile.mkdtemp(prefix="kmpy-")
        self.socket = os.path.join(self.dir, "km.sock")
        pool: Dict[str, Any] = {"keys": key_dicts(keys)}
        strategy = options.get("strategy", "least_busy")
        pool["strategy"] = getattr(strategy, "value", strategy)
        for opt in ("default_cooldown", "max_failures", "acquire_timeout", "rate_margin"):
            if opt in options:
                pool[opt] = options[opt]
        config = {"socket": self.socket, "state_file": os.path.join(self.dir, "state.json"),
                  "pools": {"test": pool}}
        self.config = os.path.join(self.dir, "config.json")
        with open(self.config, "w") as f:
            json.dump(config, f)
        self.log = open(os.path.join(self.dir, "broker.log"), "w+")
        self.proc = subprocess.Popen([BROKER, "--config", self.config], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 10
        while True:  # ready when the socket accepts connections
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"keymesh-broker exited {self.proc.returncode}: {self.log.read()}")
            if os.path.exists(self.socket):
                try:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(self.socket)
                    break
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError("keymesh-broker did not create its socket in 10 s")
            time.sleep(0.005)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # The broker keeps its shared-memory segment on exit (a restarted
        # broker re-attaches to it); a test's broker is gone for good.
        self.log.seek(0)
        for word in self.log.read().split():
            if word.startswith("segment=keymesh"):
                try:
                    os.unlink("/dev/shm/" + word[len("segment="):])
                except FileNotFoundError:
                    pass
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


MODES = ["embedded", "attached"]


@pytest.fixture(params=MODES)
def mode(request: Any) -> str:
    if request.param == "attached" and not broker_available():
        pytest.fail(f"keymesh-broker not built ({BROKER}): build it first (scripts/setup)")
    return request.param


@pytest.fixture
def make_pool(mode: str):
    """make_pool(keys, cls=SyncKeyPool, **options) -> pool (closed at teardown)."""
    made: List[Any] = []
    brokers: List[Broker] = []

    def make(keys: List[Any], cls: Any = keymesh.SyncKeyPool, **options: Any) -> Any:
        if mode == "embedded":
            pool = cls(keys, **options)
        else:
            storage = options.pop("storage", None)
            broker = Broker(keys, options)
            brokers.append(broker)
            # py-sched: a scheduler goes to connect as to the constructor.
            extra = {"scheduler": options["scheduler"]} if options.get("scheduler") is not None else {}
            pool = cls.connect("test", socket=broker.socket, storage=storage, **extra)
        made.append(pool)
        return pool

    make.mode = mode  # type: ignore[attr-defined]
    yield make
    for pool in made:
        core = pool._core
        core.close()
    for broker in brokers:
        broker.stop()


# ---- asyncio debug mode ------------------------------------------------------
# A callback (a coroutine step) that runs longer than this blocked the loop: a
# blocking call where an await belongs. Well above what a coroutine step of
# the pool costs, well below any blocking wait; $KEYMESH_SLOW_CALLBACK overrides.
SLOW_CALLBACK = float(os.environ.get("KEYMESH_SLOW_CALLBACK", "0.08"))


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "slow_callback(seconds): the asyncio_debug bound for this test")


class DebugLoopPolicy(asyncio.DefaultEventLoopPolicy):
    """New loops (asyncio.run's included) in debug mode, flagging slow callbacks."""

    def __init__(self, slow_callback: float = SLOW_CALLBACK) -> None:
        super().__init__()
        self.slow_callback = slow_callback

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = super().new_event_loop()
        loop.set_debug(True)
        loop.slow_callback_duration = self.slow_callback
        return loop


def _run_delay_s(tid: Optional[int] = None) -> Optional[float]:
    """The seconds a thread (this one by default) has waited for a CPU so far
    (the kernel's run-queue delay, field 2 of schedstat); None if unknown."""
    path = "/proc/thread-self/schedstat" if tid is None else f"/proc/self/task/{tid}/schedstat"
    try:
        with open(path, "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


class CpuWaits:
    """When each thread of this process waited for a CPU (sampled every 5 ms)
    and when the garbage collector ran: the parts of a slow step that are no
    blocking call. On a loaded machine (the suite runs beside others on two
    cores) a step that waits for a CPU, or for a collection, runs long
    without blocking anything."""

    PERIOD = 0.005

    def __init__(self) -> None:
        self.samples: Dict[int, Deque[Tuple[float, float]]] = collections.defaultdict(
            lambda: collections.deque(maxlen=4000))
        self.collections: Deque[Tuple[float, float]] = collections.deque(maxlen=1000)
        self._gc_start = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="cpu-waits", daemon=True)

    def __enter__(self) -> "CpuWaits":
        gc.callbacks.append(self._on_gc)
        self._sample_once()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: Dict[str, Any]) -> None:
        if phase == "start":
            self._gc_start = time.monotonic()
        else:
            self.collections.append((self._gc_start, time.monotonic()))

    def _sample_once(self) -> None:
        try:
            tids = [int(t) for t in os.listdir("/proc/self/task")]
        except OSError:
            return
        now = time.monotonic()
        for tid in tids:
            d = _run_delay_s(tid)
            if d is not None:
                self.samples[tid].append((now, d))

    def _sample(self) -> None:
        while not self._stop.wait(self.PERIOD):
            self._sample_once()

    def discount(self, tid: int, start: float, end: float, delay_at_end: Optional[float]) -> float:
        """The seconds of [start, end] this thread waited for a CPU (from the
        last sample at or before start: a little more, never less) or the
        collector ran."""
        # list() copies a deque in one step under the GIL: the sampler and
        # the collector's callback append to them from other threads.
        waited = 0.0
        s = list(self.samples.get(tid) or ())
        if s and delay_at_end is not None:
            i = bisect.bisect_right([t for t, _ in s], start) - 1
            if i >= 0:
                waited = max(0.0, delay_at_end - s[i][1])
        collected = sum(max(0.0, min(end, b) - max(start, a)) for a, b in list(self.collections))
        return waited + collected


_TOOK = re.compile(r" took (\d+(?:\.\d+)?) seconds")


class SlowCallbacks(logging.Handler):
    """Collects asyncio's "Executing <handle> took N seconds" warnings whose
    step, less the time it waited for a CPU or the garbage collector
    (`waits`, when given), still ran at least `bound` seconds: a blocking
    call (a sleep, a lock, I/O) where an await belongs."""

    def __init__(self, waits: Optional[CpuWaits] = None, bound: float = SLOW_CALLBACK) -> None:
        super().__init__(logging.WARNING)
        self.slow: List[str] = []
        self.waits = waits
        self.bound = bound

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if not (msg.startswith("Executing ") and " took " in msg):
            return
        m = _TOOK.search(msg)
        if self.waits is not None and m is not None:
            end = time.monotonic()  # asyncio logs right after the step
            took = float(m.group(1))
            spared = self.waits.discount(threading.get_native_id(), end - took, end, _run_delay_s())
            if took - spared < self.bound:
                return
            msg += f" ({spared:.3f} s of it waiting for a CPU or the garbage collector)"
        self.slow.append(msg)


@pytest.fixture
def asyncio_debug(request: Any) -> Iterator[SlowCallbacks]:
    marker = request.node.get_closest_marker("slow_callback")
    bound = float(marker.args[0]) if marker else SLOW_CALLBACK
    old_policy = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(DebugLoopPolicy(bound))
    logger = logging.getLogger("asyncio")
    old_level = logger.level
    with CpuWaits() as waits:
        handler = SlowCallbacks(waits, bound)
        logger.addHandler(handler)
        if logger.getEffectiveLevel() > logging.WARNING:
            logger.setLevel(logging.WARNING)
        try:
            yield handler
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old_level)
            asyncio.set_event_loop_policy(old_policy)
    if handler.slow:
        pytest.fail("a blocking call in the event loop (asyncio debug mode): " + "; ".join(handler.slow[:3]),
                    pytrace=False)


# ---- forked processes (the tests of what crosses processes) ------------------

def fork(fn):
    """Runs fn() in a forked child; returns its pid. The child exits 0 when fn
    returns, 1 when it raises."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        except BaseException:  # noqa: BLE001 - report through the exit status
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def wait_ok(pid):
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child {pid} failed: {status}"
