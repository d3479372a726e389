"""Re-creating per-process state in a forked child (os.register_at_fork).

A lock held by another thread at fork() stays held for ever in the child,
where that thread does not exist; objects that own threading locks or
threads register here and get ``_after_fork_in_child()`` called in every
child, before any of the child's own code runs.
"""
from __future__ import annotations

import os
import weakref
from typing import Any

_objects: "weakref.WeakSet[Any]" = weakref.WeakSet()


def register(obj: Any) -> None:
    """Calls ``obj._after_fork_in_child()`` in every child forked while obj lives."""
    _objects.add(obj)


def _after_fork_in_child() -> None:
    global _objects
    objs = list(_objects)
    _objects = weakref.WeakSet(objs)  # its own guard lock may have been held, too
    for obj in objs:
        obj._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
