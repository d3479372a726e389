"""uwsgi hooks for KeyMesh pools created in the master (no lazy-apps).

Call ``keymesh.uwsgi.install()`` once after creating your pools (in the
module uwsgi loads before forking). Workers then register with the broker
right after fork (uwsgidecorators.postfork). uwsgi has no Python hook in
the master when a worker dies: the broker reaps dead workers by itself, and
for embedded pools call ``pool.reclaim_dead()`` (e.g. from a uwsgi timer or
mule) to free keys a killed worker held.
"""
from __future__ import annotations

from . import gunicorn as _gunicorn


def after_fork() -> None:
    _gunicorn.post_fork(None, None)


def install() -> bool:
    """Registers after_fork with uwsgidecorators.postfork. False outside uwsgi."""
    try:
        from uwsgidecorators import postfork  # type: ignore[import]
    except ImportError:
        return False
    postfork(after_fork)
    return True
