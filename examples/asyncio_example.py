"""KeyMesh with asyncio: many concurrent tasks share three keys.

    PYTHONPATH=client/python python3 examples/asyncio_example.py

Each "request" holds a key (at most 2 at once per key), and now and then
the fake provider answers 429: the key cools down for 0.2 s and the other
tasks keep going on the remaining keys; tasks that find no key wait without
blocking the event loop and resume as soon as one is free.
"""
from __future__ import annotations

import asyncio
import random

import keymesh


async def fake_provider_call(key: str) -> int:
    await asyncio.sleep(random.uniform(0.005, 0.02))
    return 429 if random.random() < 0.05 else 200


async def one_request(pool: keymesh.KeyPool, i: int) -> None:
    async with pool.lease(timeout=10) as key:  # released with the measured latency
        status = await fake_provider_call(key)
        if status == 429:
            await pool.mark_rate_limited(key, cooldown=0.2)  # ends this lease


async def main() -> None:
    keys = [{"secret": f"sk-example-{c * 20}", "max_concurrency": 2} for c in "abc"]
    async with keymesh.KeyPool(keys, strategy=keymesh.SchedulerStrategy.LEAST_BUSY) as pool:
        await asyncio.gather(*(one_request(pool, i) for i in range(200)))
        status = pool.status()
        m = status["pool_metrics"]
        print(f"acquires={m['total_acquires']} releases={m['total_releases']} "
              f"429s={m['total_rate_limited']} failed_acquires={m['no_key_available_count']}")
        for k in status["keys"]:
            print(f"  {k['name']:6} {k['key_suffix']:8} ok={k['success_count']:3} "
                  f"429={k['rate_limited_count']:2} latency_avg={k['latency_avg'] * 1000:.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
