"""gunicorn server hooks for KeyMesh pools created before fork (--preload).

In gunicorn.conf.py::

    from keymesh.gunicorn import post_fork, child_exit  # noqa: F401

or call them from your own hooks. ``post_fork`` (in the worker) makes every
attached pool register the new worker with the broker right away instead of
on its first request; ``child_exit`` (in the master) frees at once the keys a
dead worker still held: the broker is asked to reclaim it (it would also do
so by itself when it notices the death), and embedded pools, which have no
broker, free the leases of dead holders.
"""
from __future__ import annotations

import logging
from typing import Any

from . import _core
from .exceptions import KeyMeshError

log = logging.getLogger("keymesh")


def post_fork(server: Any, worker: Any) -> None:
    for core in list(_core.live_cores):
        if core.closed or not core.attached:
            continue
        try:
            core.available_count()  # first call in the child: reconnects and registers
        except KeyMeshError as e:
            log.warning("keymesh: worker %s could not register with the broker yet: %s",
                        getattr(worker, "pid", "?"), e)


def child_exit(server: Any, worker: Any) -> None:
    from . import reclaim_worker
    pid = getattr(worker, "pid", None)
    if pid:
        n = reclaim_worker(pid)
        if n:
            log.info("keymesh: reclaimed %d lease(s) of exited worker %s", n, pid)
