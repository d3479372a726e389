"""SyncKeyPool: the original's threaded, blocking pool, over the shared segment.

One pool object may be used from any number of threads; a pool created
before fork() works in every child (see keymesh/__init__.py).

The hot path (acquire, release, mark_failed, mark_rate_limited, cancel)
calls the extension keymesh._native straight from each method: one C call,
which range-checks the arguments and releases the GIL only when it may
block.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

from .._base import PoolBase, key_ops, reporting


class SyncKeyPool(PoolBase):
    """A pool of API keys shared by threads and processes.

    Embedded (the original's constructor; no broker: state lives in an
    anonymous shared mapping inherited by children forked afterwards)::

        pool = SyncKeyPool(["sk-a", "sk-b"], strategy="least_busy")

    Attached to a keymesh-broker (shared by every process on the host)::

        pool = SyncKeyPool.connect("openai", socket="/run/keymesh/keymesh.sock")

    ``keys`` items are secrets (str), ``(name, secret)`` pairs, or dicts with
    ``secret`` and optional ``name``, ``weight``, ``max_concurrency``,
    ``rpm``, ``tpm``, ``burst``, ``rate_margin``.
    """

    _owner = "SyncKeyPool"

    # The calls of every request, bound per pool straight to the extension's
    # methods (same arguments, keywords and defaults), so a pair runs no
    # Python frame (100k pairs, 30 runs on a busy 2-core VM: min 561 -> 506 ns,
    # median 1022 -> 873 ns). A subclass that overrides one keeps its
    # override; the methods below stay for help() and for subclasses.
    _HOT = ("acquire", "release", "mark_failed", "mark_rate_limited", "cancel")

    def _bind_hot_path(self) -> None:
        native = self._core.native
        cls = type(self)
        for name in self._HOT:
            if getattr(cls, name) is getattr(SyncKeyPool, name):
                setattr(self, name, getattr(native, name))

    # ---- keys ---------------------------------------------------------
    def acquire(self, timeout: Optional[float] = None, tokens: int = 0) -> str:
        """The secret of an eligible key; waits up to ``timeout`` seconds (default:
        the pool's acquire_timeout). Raises NoAvailableKeyError. The GIL is
        released while waiting. ``tokens``: the request's expected token count,
        reserved up front from the key's TPM budget (release(tokens=) corrects it)."""
        return self._core.native.acquire(timeout, tokens)

    def release(self, key: str, latency: Optional[float] = None, tokens: int = 0) -> None:
        """Success. ``latency`` None leaves the key's latency average unchanged.
        KeyNotHeldError if this process does not hold ``key``; UnknownKeyError if
        the key is not in the pool."""
        self._core.native.release(key, latency, tokens)

    def mark_failed(self, key: str, permanent: bool = False) -> None:
        """A non-429 failure; KeyExhaustedError when this failure made the key
        reach max_failures (once: the key's circuit opens for its cooldown, then
        one caller probes it). ``permanent=True`` (an authentication failure,
        e.g. HTTP 401) revokes the key until reset_key/add_key."""
        self._core.native.mark_failed(key, permanent)

    def mark_rate_limited(self, key: str, cooldown: Optional[float] = None) -> None:
        """A 429: cools the key for ``cooldown`` seconds (None: the pool's default)."""
        self._core.native.mark_rate_limited(key, cooldown)

    def cancel(self, key: str) -> None:
        """Ends the lease without an outcome (the request was never sent)."""
        self._core.native.cancel(key)

    @contextlib.contextmanager
    def lease(self, timeout: Optional[float] = None) -> Iterator[str]:
        """Acquire; on exit release with the measured latency, or on an exception
        mark the key failed (KeyExhaustedError is logged, the original exception
        propagates). If the block already reported an outcome for the key
        (e.g. mark_rate_limited), nothing more is reported."""
        key = self._core.acquire(timeout)
        with reporting(self._core, key):
            yield key

    # ---- administration -------------------------------------------------
    def add_key(self, key: str, name: Optional[str] = None, **limits: Any) -> None:
        """Adds a key, or re-admits an existing one (clears its failure streak and
        exhaustion, keeps its counters). ``limits``: weight, max_concurrency, rpm,
        tpm, burst, rate_margin."""
        self._core.add_key(key, name, **limits)

    remove_key, enable_key, disable_key, reset_key = key_ops(asynchronous=False)

    def close(self) -> None:
        """Idempotent. Waiting acquires raise PoolClosedError."""
        self._core.close()

    def __enter__(self) -> "SyncKeyPool":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
