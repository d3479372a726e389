"""The mesh benchmark (scripts/bench-mesh; not a test): N hosts on one
machine (keymesh-brokers h1..hN with uneven worker farms, 4, 2, 1 by
default) share 2 keys x 600 rpm at the mock provider, which enforces each
key's global limit. Contenders, each for the same duration, one after the
other in one run, with the same demand:

  mesh           the brokers share the keys through one redis-server (the
                 `mesh` config object)
  isolated       the same brokers without `mesh`, each configured with the
                 keys' full limits (what a farm of several hosts does today)
  redis-gcra     no broker: every acquire is one EVALSHA of a Lua GCRA over
                 the keys against the same redis-server, in Python workers
  mesh, frozen   the mesh with redis-server SIGSTOPped for part of the run
                 (shorter than the lease)
  mesh, killed   the mesh with redis-server SIGKILLed a third of the way in
                 (the rest of the run without Redis: the lease, then `outage`)

Beside the mesh row's calls to Redis, the 'keys' row runs the same farm
against --many-keys keys (default 20) and reports only its calls to Redis:
one lease call per refresh, whatever the number of keys.

Then the cooldown propagation: one host's worker gets a 429 with
Retry-After from the provider and reports it; the time until every other
host's segment shows the key cooling (read by an attached pool's status(),
which reads the segment), over --trials trials.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import mesh_farm as mf  # noqa: E402
from farm import Caller, percentile  # noqa: E402


def run_row(c: mf.Cluster, label: str, mode: str, args: argparse.Namespace, plans: list[mf.WorkerPlan],
            mesh: dict[str, Any] | None, fault: str = "") -> dict[str, Any]:
    """One contender: brokers (unless mode is gcra), the farm, the figures."""
    gcra = None
    modes_end: dict[str, str] = {}
    if mode == "gcra":
        gcra = mf.Gcra.load(c.redis.port, [c.secrets[k.name] for k in c.keys], c.keys[0].rpm)
    else:
        c.start_brokers(mesh)
        if mesh is not None:
            modes = c.wait_mesh(timeout=args.lease + 10)
            if any(m != "leased" for m in modes.values()):
                print(f"bench-mesh: {label}: not every host leased before the load: {modes}", flush=True)
    idle_load = None
    count_redis = mesh is not None and not fault
    if count_redis and args.idle > 0:
        # Every host leased, no worker yet: what an idle mesh asks of Redis.
        c.redis.call("CONFIG", "RESETSTAT")
        r0 = total_refreshes(c), time.monotonic()
        time.sleep(args.idle)  # the measurement window, not a settle
        idle_load = redis_load(c, r0, args.refresh)
    c.provider_reset()
    if count_redis:
        c.redis.call("CONFIG", "RESETSTAT")
        busy_r0 = total_refreshes(c), time.monotonic()
    events: list[tuple[float, Any]] = []
    fault_at = args.seconds / 3
    if fault == "frozen":
        events += [(fault_at, lambda _t: c.redis.freeze()), (fault_at + args.freeze, lambda _t: c.redis.thaw())]
    elif fault == "killed":
        events.append((fault_at, lambda _t: c.redis.kill()))
    half_stats: dict[str, Any] = {}
    if count_redis:
        def note_half(_t: float) -> None:
            # The steady state's calls: the second half's, from these counts.
            half_stats["cmds"] = redis_commands(c)
            half_stats["since"] = total_refreshes(c), time.monotonic()
        events.append((args.seconds / 2, note_half))
    if mesh is not None:
        def note_modes(_t: float) -> None:
            for h in c.hosts:
                st = c.mesh_status(h)
                modes_end[h.name] = str(st.get("mode")) if st else "?"
        events.append((max(0.0, args.seconds - 1.0), note_modes))
        if args.trace:
            def trace(t: float) -> None:
                cells = []
                for h in c.hosts:
                    st = c.mesh_status(h) or {}
                    keys = st.get("keys") or []
                    cells.append(f"{h.name} " + " ".join(
                        f"{float(k.get('share_rpm', 0)) / 60:4.1f}/{float(k.get('wants_rpm', 0)) / 60:4.1f}"
                        for k in keys if isinstance(k, dict)))
                print(f"  t={t:5.1f}s share/wants per key (req/s): " + " | ".join(cells), flush=True)
            events += [(float(t), trace) for t in range(1, int(args.seconds))]
    result = mf.run_farm(c, mode, args.seconds, plans, events=events, gcra=gcra)
    busy_load = redis_load(c, busy_r0, args.refresh) if count_redis else None
    half_load = redis_load(c, half_stats["since"], args.refresh, half_stats["cmds"]) \
        if count_redis and half_stats else None
    stats = c.provider_stats()
    counts = mf.totals(result.reports)
    calls = counts["ok"] + counts["429"] + counts["401"] + counts["other"]
    refused = sum(k["rate_limited"] for k in stats["keys"].values())
    refused_at = sorted(t for k in stats["keys"].values() for t in k.get("refused_at", []))
    over = {w: worst_window(stats, w) for w in OVER_WINDOWS}
    p50, p99 = mf.wait_percentiles(result.reports)
    halves = mf.per_host(result.reports, len(c.hosts))
    served = [sum(row) for row in halves]
    # The steady state: the calls that completed in the second half (a call
    # offered in the first half and served in the second counts there).
    done = mf.per_host(result.reports, len(c.hosts), "phase_done")
    second = sum(row[1] if len(row) > 1 else 0 for row in done)
    row = {"label": label, "served_s": counts["ok"] / args.seconds,
           "capacity_share": counts["ok"] / (c.capacity_per_second() * args.seconds),
           "second_half": second / (c.capacity_per_second() * args.seconds / 2),
           "calls": calls, "refused": refused, "refused_pct": 100.0 * refused / calls if calls else 0.0,
           "per_host": [s / args.seconds for s in served], "p50": p50, "p99": p99,
           "no_key": counts["no_key"], "failed": result.failed,
           "modes": "/".join(modes_end.get(h.name, "?") for h in c.hosts) if mesh is not None else "",
           "redis_idle": idle_load, "redis_busy": busy_load, "redis_half": half_load, "refused_at": refused_at,
           "over": over}
    return row


# The sliding windows (seconds) over which the bench counts a key's calls
# beyond its limit: the provider's own second, then longer ones, over which
# the shares' pre-accounting (their sum at most the limit less the headroom)
# leaves no room for the hosts' bursts (at most one call per host and key).
OVER_WINDOWS = (1, 5, 15)
# The mesh's default headroom (docs/MESH.md), which the bench's config keeps.
MESH_HEADROOM = 0.02


def worst_window(stats: dict[str, Any], seconds: float) -> int:
    """The most calls any key got, in any window of `seconds` (sliding, from
    one of its calls), beyond its limit over that window; 0 when none did."""
    worst = 0
    for k in stats["keys"].values():
        times = sorted(k.get("calls_at") or [])
        cap = int(k.get("per_second") or 0) * seconds
        if not cap:
            continue
        j = 0
        for i, t in enumerate(times):
            while j < len(times) and times[j] < t + seconds:
                j += 1
            worst = max(worst, j - i - cap)
    return int(worst)


def redis_commands(c: mf.Cluster) -> dict[str, int]:
    """redis-server's calls per command since the last CONFIG RESETSTAT."""
    text = c.redis.call("INFO", "commandstats")
    out: dict[str, int] = {}
    for line in (text or b"").decode(errors="replace").splitlines():
        if line.startswith("cmdstat_") and ":calls=" in line:
            name, rest = line[len("cmdstat_"):].split(":", 1)
            out[name] = int(rest.split(",", 1)[0][len("calls="):])
    return out


def total_refreshes(c: mf.Cluster) -> int:
    return sum(int((c.mesh_status(h) or {}).get("refreshes", 0)) for h in c.hosts)


# The commands a broker sends (round trips; INFO commandstats also counts
# the commands its scripts run inside Redis, which are no calls).
BROKER_COMMANDS = ("evalsha", "eval", "xread", "script|load", "auth", "select", "ping")


def redis_load(c: mf.Cluster, since: tuple[int, float], refresh_s: float,
               base: dict[str, int] | None = None) -> dict[str, Any]:
    """The brokers' calls to Redis since the last reset, or since the counts
    `base` (at `since`: all hosts' refreshes then, and time.monotonic()) per
    host and refresh period (the hosts times the seconds since over the
    refresh period), in all and by command, and per refresh done (the early
    ones too: a rebalance's). TIME is left out: the scripts call it too, and
    a broker only once per connection."""
    base = base or {}
    cmds = {k: v - base.get(k, 0) for k, v in redis_commands(c).items() if k in BROKER_COMMANDS}
    cmds = {k: v for k, v in cmds.items() if v > 0}
    refreshes = max(1, total_refreshes(c) - since[0])
    periods = max(1e-9, len(c.hosts) * (time.monotonic() - since[1]) / refresh_s)
    return {"per_period": sum(cmds.values()) / periods, "periods": periods,
            "per_refresh": sum(cmds.values()) / refreshes, "refreshes": refreshes,
            "by": {k: v / periods for k, v in sorted(cmds.items(), key=lambda kv: -kv[1])}}


def fastpath(args: argparse.Namespace, mesh: dict[str, Any]) -> list[dict[str, Any]]:
    """The workers' fast path beside the mesh: two brokers of one pool of 8
    keys (limits far above what pairs reach, so pacing never waits), h1
    without a mesh, h2 with one; one process attached to both times
    acquire+release pairs on each, alternated (keymesh-bench
    attached-pairs), with Redis healthy, frozen, killed while h2's lease
    holds, and killed after it ran out (h2 in its outage mode)."""
    keys = [mf.KeySpec(f"fast-{i}", 2_000_000_000) for i in range(8)]
    c = mf.Cluster(args.build, keys, [1, 1], prefix="keymesh-bench-fast-")
    plain, meshed = c.hosts
    out: list[dict[str, Any]] = []

    def measure(label: str) -> None:
        r = subprocess.run([os.path.join(c.bin, "keymesh-bench"), "attached-pairs", mf.POOL, "9", plain.sock,
                            meshed.sock], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise SystemExit(f"bench-mesh: keymesh-bench attached-pairs failed: {r.stderr.strip()[-500:]}")
        ns = json.loads(r.stdout)["pair_ns"]
        st = c.mesh_status(meshed) or {}
        out.append({"label": label, "plain": float(ns[0]), "mesh": float(ns[1]), "mode": str(st.get("mode", "?"))})

    try:
        c.redis.start()
        c.start_brokers(mesh, mesh_hosts={meshed.name})
        modes = c.wait_mesh(timeout=args.lease + 10, hosts=[meshed])
        if modes.get(meshed.name) != "leased":
            print(f"bench-mesh: fastpath: {meshed.name} not leased: {modes}", flush=True)
        measure("healthy")
        c.redis.freeze()
        try:
            measure("frozen")
        finally:
            c.redis.thaw()
        c.wait_mesh(timeout=args.lease + 10, hosts=[meshed])
        c.redis.kill()
        measure("killed, lease held")
        c.wait_mesh(timeout=args.lease + 10, modes=("share",), hosts=[meshed])
        measure("killed, lease over")
    finally:
        c.cleanup()
    return out


def many_keys(args: argparse.Namespace, workers: list[int], plans: list[mf.WorkerPlan],
              mesh: dict[str, Any]) -> dict[str, Any]:
    """The mesh row again with --many-keys keys of 600 rpm (the same farm,
    which then never contends for them), in its own cluster: only its calls
    to Redis per host and refresh period are reported, beside the mesh
    row's, to show that a refresh is one call whatever the number of keys."""
    keys = [mf.KeySpec(f"key-{i:03d}", 600) for i in range(args.many_keys)]
    c = mf.Cluster(args.build, keys, workers, concurrency=8, prefix="keymesh-bench-keys-")
    try:
        c.start_provider()
        c.redis.start()
        row = run_row(c, f"mesh, {len(keys)} keys", "keymesh", args, plans, mesh)
        c.stop_brokers()
    finally:
        c.cleanup()
    row["table"] = False
    return row


def propagation(c: mf.Cluster, trials: int, retry_after: float) -> dict[str, Any]:
    """In a forked process: pools attached to every host; per trial one host
    acquires a key, gets a forced 429 with Retry-After from the provider and
    reports it; polls the other hosts' segments until each shows the key
    cooling. Returns the delays (seconds)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            out = _propagation_trials(c, trials, retry_after)
            data = json.dumps(out).encode()
            while data:
                data = data[os.write(w, data):]
        except BaseException:  # noqa: BLE001 - never return into the master's code
            import traceback  # noqa: PLC0415
            traceback.print_exc()
            code = 1
        os._exit(code)
    os.close(w)
    c.workers.append(pid)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    c.workers.remove(pid)
    return json.loads(data) if data else {"all": [], "each": [], "missed": trials, "error": "the trial process failed"}


def _cooling(pool: Any, name: str) -> bool:
    for k in pool.status()["keys"]:
        if k["name"] == name:
            return float(k["cooldown_remaining"]) > 0 or k["state"] == "cooling"
    return False


def _propagation_trials(c: mf.Cluster, trials: int, retry_after: float) -> dict[str, Any]:
    import keymesh  # noqa: PLC0415

    pools = [keymesh.SyncKeyPool.connect(mf.POOL, socket=h.sock) for h in c.hosts]
    caller = Caller(c.port)
    all_delays: list[float] = []
    each: list[float] = []
    missed = 0
    rng = random.Random(11)
    for trial in range(trials):
        origin = trial % len(pools)
        others = [i for i in range(len(pools)) if i != origin]
        key = pools[origin].acquire(timeout=10)
        name = pools[origin].key_name(key)
        # Every other host must see the key ready first (the previous trial's
        # cooldown over), or a stale cooldown would count as delivered.
        deadline = time.monotonic() + 10
        while any(_cooling(pools[i], name) for i in others) and time.monotonic() < deadline:
            time.sleep(0.01)  # the previous cooldown running out, bounded by the deadline
        status, retry, _ = caller.call(key, {"X-Mock-Status": "429", "X-Mock-Retry-After": f"{retry_after:.3f}"})
        if status != 429:
            pools[origin].cancel(key)
            missed += 1
            continue
        t0 = time.monotonic()
        pools[origin].mark_rate_limited(key, cooldown=retry)
        pending = set(others)
        seen: dict[int, float] = {}
        deadline = t0 + max(2.0, retry_after)
        while pending and time.monotonic() < deadline:
            for i in list(pending):
                if _cooling(pools[i], name):
                    seen[i] = time.monotonic() - t0
                    pending.discard(i)
        if pending:
            missed += 1
        else:
            all_delays.append(max(seen.values()))
        each.extend(seen.values())
        # Let the cooldown run out everywhere before the next trial, with a
        # random gap so trials do not lock onto the refresh phase.
        end = time.monotonic() + retry_after + rng.uniform(0.05, 0.3)
        while time.monotonic() < end:
            time.sleep(end - time.monotonic())  # the trial's own schedule
    for p in pools:
        p.close()
    return {"all": all_delays, "each": each, "missed": missed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("seconds", type=float, nargs="?", default=30.0, help="seconds per contender (default 30)")
    parser.add_argument("--workers", default="4,2,1", help="worker processes per host (one host per number)")
    parser.add_argument("--rate", type=float, default=3.0,
                        help="requests/s each worker offers (0: as fast as it gets keys); default 3")
    parser.add_argument("--refresh", type=float, default=1.0, help="the mesh's refresh (s)")
    parser.add_argument("--lease", type=float, default=10.0, help="the mesh's lease (s)")
    parser.add_argument("--freeze", type=float, default=5.0, help="seconds redis-server is frozen (< lease)")
    parser.add_argument("--trials", type=int, default=20, help="cooldown propagation trials")
    parser.add_argument("--idle", type=float, default=10.0,
                        help="seconds the mesh row first counts Redis commands with no load (0: not)")
    parser.add_argument("--many-keys", type=int, default=20,
                        help="keys of the 'keys' row, which counts the mesh's Redis calls with that many keys")
    parser.add_argument("--rows", default="mesh,keys,isolated,redis-gcra,frozen,killed,propagation,fastpath")
    parser.add_argument("--trace", action="store_true",
                        help="print each host's share and wants of each key every second of the mesh rows")
    parser.add_argument("--build", default=os.path.join(mf.ROOT, "build"))
    args = parser.parse_args()
    args.build = os.path.abspath(args.build)
    workers = [int(n) for n in args.workers.split(",") if n.strip()]
    if not workers or any(n < 1 for n in workers) or len(workers) > 8:
        parser.error("--workers: 1 to 8 hosts, each at least 1 worker")
    if not 1 <= args.many_keys <= 256:
        parser.error("--many-keys: 1 to 256")
    if args.freeze >= args.lease:
        parser.error("--freeze must be shorter than --lease")
    rows_wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    os.environ.setdefault("KEYMESH_LIB", os.path.join(args.build, "lib", "libkeymesh.so"))
    problem = mf.check_binaries(args.build)
    if problem:
        print("bench-mesh: " + problem, file=sys.stderr)
        return 2

    keys = [mf.KeySpec("key-a", 600), mf.KeySpec("key-b", 600)]
    c = mf.Cluster(args.build, keys, workers, concurrency=8, prefix="keymesh-bench-mesh-")
    # Two phases of the same rate: the second half's figures show the steady
    # state apart from the start (a mesh host's share grows from a floor).
    plans = [mf.WorkerPlan(h, [mf.Phase(0.0, args.rate), mf.Phase(args.seconds / 2, args.rate)])
             for h, n in enumerate(workers) for _ in range(n)]
    mesh = {"namespace": mf.NAMESPACE, "refresh": args.refresh, "lease": args.lease, "outage": "share"}
    offered = ", ".join(f"{h.name} {n * args.rate:g}/s" for h, n in zip(c.hosts, workers)) if args.rate > 0 \
        else "as fast as each worker gets keys"
    print(f"bench-mesh: {len(workers)} hosts x {'/'.join(map(str, workers))} worker processes, "
          f"{len(keys)} keys x 600 rpm at the mock provider ({c.capacity_per_second():g} requests/s in all, "
          f"quantized per second), {args.seconds:g} s per contender; offered: {offered}; "
          f"mesh refresh {args.refresh:g} s, lease {args.lease:g} s, outage share", flush=True)
    master = os.getpid()
    mf.install_signals()
    rows: list[dict[str, Any]] = []
    prop: dict[str, Any] | None = None
    fast: list[dict[str, Any]] = []
    try:
        c.start_provider()
        c.redis.start()
        for name in rows_wanted:
            t = time.monotonic()
            if name == "mesh":
                rows.append(run_row(c, "mesh", "keymesh", args, plans, mesh))
                if "propagation" in rows_wanted:
                    prop = propagation(c, args.trials, 0.3)
                c.stop_brokers()
            elif name == "keys":
                rows.append(many_keys(args, workers, plans, mesh))
            elif name == "isolated":
                rows.append(run_row(c, "isolated", "keymesh", args, plans, None))
                c.stop_brokers()
            elif name == "redis-gcra":
                rows.append(run_row(c, "redis-gcra", "gcra", args, plans, None))
            elif name == "frozen":
                rows.append(run_row(c, f"mesh, redis frozen {args.freeze:g}s", "keymesh", args, plans, mesh,
                                    fault="frozen"))
                c.stop_brokers()
            elif name == "killed":
                rows.append(run_row(c, "mesh, redis killed", "keymesh", args, plans, mesh, fault="killed"))
                c.stop_brokers()
                c.redis.start()  # for any row after this one
            elif name == "propagation":
                continue
            elif name == "fastpath":
                fast = fastpath(args, mesh)
                print(f"bench-mesh: fastpath done ({time.monotonic() - t:.0f} s)", flush=True)
                continue
            else:
                parser.error(f"--rows: unknown row {name!r}")
            print(f"bench-mesh: {rows[-1]['label']} done ({time.monotonic() - t:.0f} s)", flush=True)
    except mf.Interrupted as e:
        print(f"\nbench-mesh: interrupted ({e}); cleaning up", file=sys.stderr)
        return 130
    finally:
        if os.getpid() == master:
            mf.ignore_signals()
            c.cleanup()
    report(rows, prop, fast, c, args)
    return 0


def report(rows: list[dict[str, Any]], prop: dict[str, Any] | None, fast: list[dict[str, Any]], c: mf.Cluster,
           args: argparse.Namespace) -> None:
    redis_rows = rows
    rows = [r for r in rows if r.get("table", True)]
    if rows:
        hosts = "/".join(h.name for h in c.hosts)
        print()
        print(f"{'contender':<26} {'served/s':>8} {'of cap':>7} {'2nd half':>8} {'calls':>6} {'refused':>8} "
              f"{'served/s ' + hosts:>22} {'acq p50':>9} {'acq p99':>9} {'no key':>6}  modes at the end")
        for r in rows:
            per_host = "/".join(f"{v:.1f}" for v in r["per_host"])
            print(f"{r['label']:<26} {r['served_s']:>8.2f} {r['capacity_share']:>7.3f} {r['second_half']:>8.3f} {r['calls']:>6} "
                  f"{r['refused_pct']:>7.2f}% {per_host:>22} {r['p50'] * 1000:>7.1f}ms {r['p99'] * 1000:>7.1f}ms "
                  f"{r['no_key']:>6}  {r['modes']}")
        print("\n'of cap': successful calls / the provider's capacity over the run ('2nd half': the calls that completed "
              "in its second half, the steady state, / the capacity over that half); "
              "'refused': the provider's 429s / calls (every refused call is one the hosts overspent); 'acq': the time a "
              "worker waits in acquire; 'no key': acquires that failed or timed out (5 s) before the row ended (a wait "
              "the row's end cut short is not counted).")
        print("targets (mesh): of cap >= 0.95, refused <= 0.5 %, per-host served following demand; refused 0 "
              f"while redis is frozen for less than the lease ({args.lease:g} s)")
    if rows:
        print("\ncalls beyond a key's limit in its worst sliding window of " +
              ", ".join(f"{w:g} s" for w in OVER_WINDOWS) + ": " + "; ".join(
                  f"{r['label']} " + "/".join(f"{r['over'][w]:+d}" if r["over"][w] else "0" for w in OVER_WINDOWS)
                  for r in rows if "over" in r))
        per_key = min(max(1, k.rpm // 60) for k in c.keys if not k.revoked and k.rpm > 0)
        print("(the provider counts per wall-clock second, so its refusals are the 1 s figure's; the shares' sum is "
              "at most the limit less the headroom, so no window of hosts x burst / (headroom x limit) or more, here "
              f"{len(c.hosts)} x 1 / ({MESH_HEADROOM:.0%} x {per_key}/s) = "
              f"{len(c.hosts) / (MESH_HEADROOM * per_key):g} s, holds a call beyond the limit; target: 0 there, in "
              "the mesh rows)")
    late = [r for r in rows if r.get("refused_at")]
    if late:
        print("\nwhen the provider refused (seconds into the row): " + "; ".join(
            f"{r['label']}: " + ", ".join(f"{t:.1f}" for t in r["refused_at"][:12]) +
            (" ..." if len(r["refused_at"]) > 12 else "") for r in late))
    for r in redis_rows:
        for what, load in (("idle (hosts leased, no worker)", r.get("redis_idle")),
                           ("under the row's load", r.get("redis_busy")),
                           ("under the row's load, its second half", r.get("redis_half"))):
            if load:
                by = ", ".join(f"{k} {v:.2f}" for k, v in load["by"].items())
                print(f"\nredis calls per host per refresh period, {r['label']} {what}: {load['per_period']:.2f} "
                      f"over {load['periods']:.0f} periods ({by}); per refresh done {load['per_refresh']:.2f} "
                      f"over {load['refreshes']} (early ones, on a rebalance, included)")
    if any(r.get("redis_busy") for r in redis_rows):
        print("(evalsha: the lease, one per refresh for all keys, and publishes, one per change; xread: the event "
              "reader's blocking read, one per batch of other hosts' changes or 30 s; target: at most one per host per "
              "refresh, whatever the number of keys)")
    if prop is not None:
        done = prop["all"]
        print(f"\ncooldown propagation (a 429 with Retry-After on one host until every other host's segment "
              f"shows the key cooling), {len(done)} trials ({prop['missed']} missed):")
        if done:
            each = prop["each"]
            print(f"  all other hosts: p50 {percentile(done, 0.5) * 1000:.2f} ms, p99 {percentile(done, 0.99) * 1000:.2f} ms, "
                  f"max {max(done) * 1000:.2f} ms;  each host: p50 {percentile(each, 0.5) * 1000:.2f} ms, "
                  f"p99 {percentile(each, 0.99) * 1000:.2f} ms   (targets p50 <= 5 ms, p99 <= 50 ms)")
        if prop.get("error"):
            print("  " + prop["error"])
    if fast:
        print("\nthe fast path beside the mesh: one acquire+release pair (keymesh::Pool attached to the segment, 8 keys, "
              "least_busy), median of 9 runs of 200,000 pairs after one to warm up, a broker without a mesh and one with it "
              "alternated in "
              "one process:")
        print(f"  {'redis':<20} {'no mesh':>9} {'mesh':>9} {'mesh/no mesh':>13}  mode of the mesh host")
        for f in fast:
            ratio = f["mesh"] / f["plain"] if f["plain"] > 0 else float("nan")
            print(f"  {f['label']:<20} {f['plain']:>7.1f}ns {f['mesh']:>7.1f}ns {ratio:>12.3f}x  {f['mode']}"
                  f"{'' if ratio <= 1.05 else '   (over 5 %)'}")
        print("  (target: within 5 % of the single-host figure with Redis healthy, frozen and killed)")


if __name__ == "__main__":
    sys.exit(main())
