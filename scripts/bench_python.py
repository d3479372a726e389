"""Python contenders for scripts/bench: one acquire+release pair timed at a
time, in PROCS forked processes, printing one JSON line like keymesh-bench's.

  bench_python.py contend py-embedded PROCS SECONDS
  bench_python.py contend py-attached PROCS SECONDS SOCKET   (pool "bench")
  bench_python.py contend py-original PROCS SECONDS

py-original is the original KeyMesh's design in pure Python (a threading.Lock
and a min over a dict of key states, see farm/original_pool.py): each
process has its own, unshared pool. The KeyMesh pools are shared by every
process.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "client", "python"))
sys.path.insert(0, os.path.join(HERE, "farm"))

KEYS = [f"sk-bench-{i:02d}-" + "x" * 24 for i in range(64)]


def make_pool(name: str, socket: str | None):
    if name == "py-original":
        from original_pool import OriginalPool  # noqa: PLC0415

        return OriginalPool(KEYS)
    import keymesh  # noqa: PLC0415

    if name == "py-embedded":
        return keymesh.SyncKeyPool(KEYS)
    if name == "py-attached":
        return keymesh.SyncKeyPool.connect("bench", socket=socket)
    raise SystemExit(f"unknown contender {name}")


def run_child(pool, until: float, out_fd: int) -> None:
    lat: list[int] = []
    pairs = 0
    clock = time.perf_counter_ns
    acquire = pool.acquire
    release = pool.release
    while time.monotonic() < until:
        for _ in range(64):
            t0 = clock()
            key = acquire()
            release(key, latency=0.1)
            lat.append(clock() - t0)
        pairs += 64
    if len(lat) > 100000:
        lat = random.sample(lat, 100000)
    os.write(out_fd, json.dumps({"pairs": pairs, "lat": lat}).encode())
    os.close(out_fd)


def contend(name: str, procs: int, seconds: float, socket: str | None) -> None:
    shared = None if name == "py-original" else make_pool(name, socket)
    start = time.monotonic() + 0.2  # let every child fork before the clock starts
    until = start + seconds
    readers = []
    pids = []
    for _ in range(procs):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                pool = shared if shared is not None else make_pool(name, socket)
                while time.monotonic() < start:
                    pass
                run_child(pool, until, w)
            finally:
                os._exit(0)
        os.close(w)
        readers.append(r)
        pids.append(pid)
    pairs = 0
    lat: list[int] = []
    for r in readers:
        chunks = []
        while True:
            b = os.read(r, 1 << 20)
            if not b:
                break
            chunks.append(b)
        os.close(r)
        rep = json.loads(b"".join(chunks))
        pairs += rep["pairs"]
        lat.extend(rep["lat"])
    for pid in pids:
        os.waitpid(pid, 0)
    lat.sort()
    print(json.dumps({"name": name, "procs": procs, "pairs_per_s": round(pairs / seconds),
                      "p50_ns": lat[len(lat) // 2], "p99_ns": lat[min(len(lat) - 1, len(lat) * 99 // 100)]}))
    if shared is not None and hasattr(shared, "close"):
        shared.close()


def main() -> int:
    if len(sys.argv) < 5 or sys.argv[1] != "contend":
        print(__doc__, file=sys.stderr)
        return 2
    contend(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
