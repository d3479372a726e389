"""RoundRobinScheduler: each key in turn. Natively it is the pool's
round_robin strategy (a cursor over slots in the shared segment).

Called on views, it is stateless: the candidate acquired longest ago
(never-used keys first, in order). With every key available that cycles
k0, k1, k2, ... as the original did; unlike the original (defect 13, a
cursor taken modulo the number of *available* keys), a key cooling down or
coming back neither makes another key skipped nor repeated, because the
rotation follows the keys' own last use rather than a position in a list
whose length changes.
"""
from __future__ import annotations

from typing import Optional, Sequence

from .base import BaseScheduler, SchedulerStrategy
from .view import KeyView


class RoundRobinScheduler(BaseScheduler):
    strategy = SchedulerStrategy.ROUND_ROBIN

    def select(self, candidates: Sequence[KeyView]) -> Optional[KeyView]:
        if not candidates:
            return None
        return min(candidates, key=lambda k: k.last_used)


__all__ = ["RoundRobinScheduler"]
