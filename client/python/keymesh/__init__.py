"""KeyMesh: a pool of AI API keys shared by every thread and process of a host.

A drop-in for the original Python package's ``KeyPool`` / ``SyncKeyPool``,
over libkeymesh.so (its C ABI: the hot path through the extension module
keymesh._native, the rest through ctypes; standard library only)::

    import keymesh

    pool = keymesh.SyncKeyPool(["sk-a", "sk-b"])          # embedded, no broker
    pool = keymesh.SyncKeyPool.connect("openai")            # attached to keymesh-broker

    with pool.lease() as key:
        call_the_api(key)

Fork safety: create the pool in the master (gunicorn --preload, uwsgi
without lazy-apps) and use it in the workers. An embedded pool's state is
inherited shared memory; an attached pool reconnects (registering the child
with the broker) on the child's first call. Leases belong to the process that
acquired them. See keymesh.gunicorn and keymesh.uwsgi for the server hooks.

Install: ``pip install --no-build-isolation --no-index ./client/python``
(offline; into a venv or the system). The package then bundles
libkeymesh.so.0 and keymesh._native (RPATH $ORIGIN), and needs neither
PYTHONPATH nor KEYMESH_LIB. The build drives CMake over the checkout, or
copies an already built build directory named by $KEYMESH_BUILD_DIR.

Where the native parts are looked up (keymesh/_lib.py):

1. the library: $KEYMESH_LIB when set (and nothing else then); else the
   libkeymesh.so.0 bundled in the installed package; else
   build/lib/libkeymesh.so of the checkout this package lives in (tests and
   development run from the checkout this way); else the system library path.
2. the extension keymesh._native: the installed package's own; else
   <build>/python/keymesh/ of the build directory whose lib/ the library came
   from; else the checkout's build/python/keymesh/. It must use the library
   loaded in step 1 (the import fails otherwise).
"""
from .exceptions import (BrokerUnavailableError, CapacityError, ConfigError, KeyCooldownError,
                         KeyExhaustedError, KeyMeshError, KeyNotHeldError, NoAvailableKeyError,
                         PoolClosedError, ProtocolError, UnknownKeyError)
from .pool import KeyPool, SyncKeyPool
from .scheduler import (BaseScheduler, LeastBusyScheduler, RoundRobinScheduler, SchedulerStrategy,
                        WeightedScheduler, build_scheduler)
from . import _core, _lib
from ._core import parse_duration, parse_retry_after
# ---- py-surface: the rest of the original's public surface ----
from typing import Any as _Any

from .concurrency import SemaphoreGroup
from .cooldown import CooldownManager
from .metrics import PoolMetrics
from .state import KeyState, SyncKeyState
from .utils.helpers import mask_key, now, retry_on, setup_logging

_LAZY = ("OpenAIHandler", "AsyncOpenAIHandler")  # need httpx: imported on first use


def __getattr__(name: str) -> _Any:
    if name in _LAZY:
        from .integrations import openai_handler
        return getattr(openai_handler, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> "list[str]":
    return sorted(set(globals()) | set(_LAZY))
# ---- end py-surface ----

__version__ = _lib.version()  # the library's: CMakeLists.txt project(VERSION) is the one place

__all__ = [
    "parse_duration", "parse_retry_after",
    "KeyPool", "SyncKeyPool", "SchedulerStrategy",
    "BaseScheduler", "RoundRobinScheduler", "LeastBusyScheduler", "WeightedScheduler", "build_scheduler",
    "KeyMeshError", "NoAvailableKeyError", "KeyExhaustedError", "KeyCooldownError", "UnknownKeyError",
    "KeyNotHeldError", "BrokerUnavailableError", "ConfigError", "ProtocolError", "PoolClosedError",
    "CapacityError", "mask_key", "reclaim_worker",
    # py-surface:
    "KeyState", "SyncKeyState", "CooldownManager", "SemaphoreGroup", "PoolMetrics", "setup_logging", "now",
    "retry_on",  # not OpenAIHandler/AsyncOpenAIHandler: `from keymesh import *` must work without httpx
]


def reclaim_worker(pid: int) -> int:
    """Frees at once the leases of worker ``pid``, which has exited: asks the broker
    of every attached pool of this process to reclaim it, and frees dead holders'
    leases in every embedded pool. Returns how many leases were freed. Errors are
    not raised (the broker also reaps dead workers by itself)."""
    freed = 0
    sockets = set()
    for core in list(_core.live_cores):
        if core.closed:
            continue
        try:
            if core.attached:
                if core.socket not in sockets:
                    sockets.add(core.socket)
                    freed += _core.broker_reclaim(pid, core.socket)
            else:
                freed += core.reclaim_dead()
        except KeyMeshError:
            pass
    return freed
