"""`scripts/demo --hosts N`: KeyMesh across hosts, on one machine.

One local redis-server, N keymesh-brokers (hosts h1..hN, each its own config,
socket, segment and state file, one mesh namespace), the mock provider
enforcing each key's global limit (it sees every host's calls), and uneven
farms of worker processes (4, 2, 1, ...). Halfway through, demand shifts:
h1's farm goes quiet and the last host's gets busy. Every second it prints
each host's share of each key (from `keymeshctl mesh --json`) and what each
host served, then the accounting check of the single-host demo, summed over
the hosts. Everything it started is removed on exit, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import mesh_farm as mf  # noqa: E402

# Two healthy keys (the case) and one the provider refuses with 401.
KEYS = [mf.KeySpec("team-a", 600), mf.KeySpec("team-b", 600), mf.KeySpec("old-key", 600, revoked=True)]
CONCURRENCY = 4
MAX_FAILURES = 3
RATE = 3.0  # requests per second each worker offers before the shift


def worker_counts(hosts: int) -> list[int]:
    return [max(1, 4 >> i) for i in range(hosts)]


def plans(workers: list[int], seconds: float) -> tuple[list[mf.WorkerPlan], list[list[float]]]:
    """Each worker offers RATE/s; at half time h1's workers drop to a sixth and
    the last host's farm offers as much as h1's did (a demand shift). Returns
    the plans and each host's offered rate per phase."""
    half = seconds / 2
    out = []
    demand = []
    last = len(workers) - 1
    for h, n in enumerate(workers):
        after = RATE
        if h == 0:
            after = RATE / 6
        elif h == last:
            after = RATE * workers[0] / n
        out += [mf.WorkerPlan(h, [mf.Phase(0.0, RATE), mf.Phase(half, after)]) for _ in range(n)]
        demand.append([RATE * n, after * n])
    return out, demand


class MeshDemo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workers = worker_counts(args.hosts)
        self.cluster = mf.Cluster(args.build, KEYS, self.workers, concurrency=CONCURRENCY,
                                  max_failures=MAX_FAILURES, prefix="keymesh-demo-mesh-")
        self.healthy = [k.name for k in KEYS if not k.revoked]
        self.last_served: list[int] = [0] * args.hosts
        self.last_t = 0.0

    def mesh_config(self) -> dict[str, Any]:
        return {"namespace": mf.NAMESPACE, "refresh": self.args.refresh, "lease": self.args.lease,
                "outage": "share"}

    def show(self, t: float) -> None:
        """One line per host: its mode, its share of each key, what it served."""
        c = self.cluster
        dt = max(1e-3, t - self.last_t)
        self.last_t = t
        lines = []
        for i, h in enumerate(c.hosts):
            st = c.mesh_status(h) or {}
            shares = {k.get("key"): k for k in st.get("keys", []) if isinstance(k, dict)}
            try:
                served = int(c.pool_status(h)["pool_metrics"]["total_releases"])
            except (SystemExit, KeyError, TypeError, ValueError):
                served = self.last_served[i]
            rate = (served - self.last_served[i]) / dt
            self.last_served[i] = served
            cols = []
            for name in self.healthy:
                k = shares.get(name)
                cols.append(f"{name} {float(k.get('share_rpm', 0)):5.0f}" if k else f"{name}     ?")
            lines.append(f"{h.name} {str(st.get('mode', '?')):<8} {'  '.join(cols)} rpm  served {rate:4.1f}/s")
        print(f"t={t:4.1f}s  " + "\n         ".join(lines), flush=True)

    def run(self) -> int:
        a, c = self.args, self.cluster
        c.start_provider()
        c.redis.start()
        c.start_brokers(self.mesh_config())
        print(f"demo: redis-server pid {c.redis.proc.pid if c.redis.proc else '?'} on 127.0.0.1:{c.redis.port}; "
              f"mock provider on port {c.port}; {len(c.hosts)} brokers: "
              + ", ".join(f"{h.name} (pid {h.proc.pid if h.proc else '?'}, segment /dev/shm/{h.segment})"
                          for h in c.hosts))
        print(f"demo: waiting for every host to lease its shares (a new Redis starts in learning mode for one "
              f"lease, {a.lease:g} s: no share is granted twice after Redis lost its state)", flush=True)
        modes = c.wait_mesh(timeout=a.lease + 10)
        print("demo: mesh modes before the load: " + ", ".join(f"{n} {m}" for n, m in modes.items()))
        plan, demand = plans(self.workers, a.seconds)
        cap_rpm = sum(k.rpm for k in KEYS if not k.revoked)
        print(f"demo: {sum(self.workers)} worker processes ({', '.join(f'{h.name}: {n}' for h, n in zip(c.hosts, self.workers))}) "
              f"for {a.seconds:.0f} s against {len(self.healthy)} keys x 600 rpm (+1 revoked key), "
              f"{cap_rpm // 60} requests/s in all at the provider; mesh refresh {a.refresh:g} s, lease {a.lease:g} s")
        print("demo: offered requests/s per host: "
              + ", ".join(f"{h.name} {d[0]:g}" for h, d in zip(c.hosts, demand))
              + f"; from t={a.seconds / 2:.0f}s: " + ", ".join(f"{h.name} {d[1]:g}" for h, d in zip(c.hosts, demand)))
        print("demo: each host's share of each key (keymeshctl mesh --json) and its successful calls per second\n")
        ticks = [(float(t), self.show) for t in range(1, int(a.seconds))]
        ticks.append((a.seconds / 2 - 0.01, lambda _t: print(f"--- t={a.seconds / 2:.0f}s: demand shifts "
                                                              f"(h1 quiet, {c.hosts[-1].name} busy)")))
        result = mf.run_farm(c, "keymesh", a.seconds, plan, events=ticks)
        return self.summary(result, demand)

    def summary(self, result: mf.FarmResult, demand: list[list[float]]) -> int:
        a, c = self.args, self.cluster
        counts = mf.totals(result.reports)
        provider = c.provider_stats()
        pools = [c.pool_status(h) for h in c.hosts]
        print(f"\n--- keymeshctl mesh on {c.hosts[0].name}   (final)")
        print(c.ctl(c.hosts[0], "mesh").stdout)
        calls = counts["ok"] + counts["429"] + counts["401"] + counts["other"]
        capacity = c.capacity_per_second() * a.seconds
        provider_ok = sum(k["ok"] for k in provider["keys"].values())
        refusals = sum(k["rate_limited"] for k in provider["keys"].values())
        served = mf.per_host(result.reports, len(c.hosts))
        half = a.seconds / 2
        print("--- summary")
        print(f"requests {calls} from {len(result.reports)} workers on {len(c.hosts)} hosts: {counts['ok']} succeeded "
              f"({counts['ok'] / a.seconds:.1f}/s, {counts['ok'] / capacity:.1%} of the provider's capacity of "
              f"{capacity / a.seconds:.0f}/s), {counts['429']} rate-limited (429, "
              f"{refusals / calls if calls else 0:.2%} of the calls), {counts['401']} refused (401), "
              f"{counts['no_key']} acquires without a key")
        for i, h in enumerate(c.hosts):
            s = served[i] + [0, 0]
            print(f"  {h.name} ({self.workers[i]} worker{'s' if self.workers[i] != 1 else ''}): served {s[0] / half:4.1f}/s of {demand[i][0]:g} offered, "
                  f"then {s[1] / half:4.1f}/s of {demand[i][1]:g} offered")
        metrics = [p["pool_metrics"] for p in pools]
        keys = [{k["name"]: k for k in p["keys"]} for p in pools]

        def total(field: str) -> int:
            return sum(int(m[field]) for m in metrics)

        revoked = [k["old-key"] for k in keys]
        leases_ok = all(int(m["total_acquires"]) == int(m["total_releases"]) + int(m["total_failures"])
                        + int(m["total_rate_limited"]) + sum(int(k["cancelled"]) for k in ks.values())
                        for m, ks in zip(metrics, keys))
        bound_401 = len(c.hosts) * (MAX_FAILURES + CONCURRENCY)
        checks = [
            ("successes: workers == brokers == provider",
             counts["ok"] == total("total_releases") == provider_ok,
             f"{counts['ok']} / {total('total_releases')} / {provider_ok}"),
            ("429s: workers == brokers", counts["429"] == total("total_rate_limited"),
             f"{counts['429']} / {total('total_rate_limited')}"),
            ("failures: workers == brokers", counts["401"] + counts["other"] == total("total_failures"),
             f"{counts['401'] + counts['other']} / {total('total_failures')}"),
            ("every lease ended on every host: acquires == successes + failures + 429s + cancelled", leases_ok,
             " / ".join(str(m["total_acquires"]) for m in metrics)),
            ("nothing in flight", sum(int(k["active_requests"]) for ks in keys for k in ks.values()) == 0, ""),
            ("revoked key out of rotation on every host",
             all(r["state"] != "available" and not r["is_available"] for r in revoked),
             " / ".join(str(r["state"]) for r in revoked)),
            (f"401s bounded by hosts x (max_failures + concurrency) = {bound_401}", counts["401"] <= bound_401,
             str(counts["401"])),
            ("provider refusals <= 0.5 % of the calls (the mesh keeps the hosts under the global limit)",
             calls > 0 and refusals <= 0.005 * calls, f"{refusals} of {calls}"),
            ("every worker process exited cleanly", result.failed == 0, str(result.failed)),
        ]
        ok = True
        for name, passed, detail in checks:
            ok = ok and passed
            print(f"  [{'ok' if passed else 'FAIL'}] {name}{'  (' + detail + ')' if detail else ''}")
        print("demo: " + ("accounting check passed" if ok else "ACCOUNTING CHECK FAILED"))
        return 0 if ok else 1


def main(args: argparse.Namespace) -> int:
    """Called by scripts/demo_farm.py with its parsed arguments (hosts >= 2)."""
    os.environ.setdefault("KEYMESH_LIB", os.path.join(args.build, "lib", "libkeymesh.so"))
    problem = mf.check_binaries(args.build)
    if problem:
        print("demo: " + problem, file=sys.stderr)
        return 2
    demo = MeshDemo(args)
    master = os.getpid()
    mf.install_signals()
    try:
        return demo.run()
    except mf.Interrupted as e:
        print(f"\ndemo: interrupted ({e}); cleaning up", file=sys.stderr)
        return 130
    finally:
        if os.getpid() == master:
            mf.ignore_signals()
            demo.cluster.cleanup()
