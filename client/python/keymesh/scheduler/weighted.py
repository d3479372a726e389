"""WeightedScheduler: keys drawn in proportion to weight x health. Natively
it is the pool's weighted strategy (stride scheduling: deterministic
proportions, no randomness).

Called on views, it draws at random with an injectable ``random.Random``
(``WeightedScheduler(rng=random.Random(7))``: reproducible; the original
used the global unseeded generator, defect 14). Each candidate's share is

    weight x (successes + 1) / (successes + failures + 2) / (1 + latency)

The smoothed success rate never reaches 0, so a key whose first requests
failed still gets a small share rather than starving (the original gave it
weight 0); a key with no latency sample yet is given the mean latency of
the candidates that have one, rather than the best possible 0; and the
original's availability factor, always 1 among candidates, is gone.
"""
from __future__ import annotations

import random
from typing import List, Optional, Sequence

from .base import BaseScheduler, SchedulerStrategy
from .view import KeyView


class WeightedScheduler(BaseScheduler):
    strategy = SchedulerStrategy.WEIGHTED

    def __init__(self, rng: Optional[random.Random] = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    @staticmethod
    def share(candidate: KeyView, default_latency: float = 0.0) -> float:
        """The candidate's relative share (see the module's docstring)."""
        rate = (candidate.success_count + 1) / (candidate.success_count + candidate.failure_count + 2)
        latency = candidate.latency_avg if candidate.has_latency else default_latency
        return max(candidate.weight, 1) * rate / (1.0 + max(latency, 0.0))

    def select(self, candidates: Sequence[KeyView]) -> Optional[KeyView]:
        if not candidates:
            return None
        sampled = [c.latency_avg for c in candidates if c.has_latency]
        default = sum(sampled) / len(sampled) if sampled else 0.0
        shares: List[float] = [self.share(c, default) for c in candidates]
        r = self._rng.random() * sum(shares)
        acc = 0.0
        for c, s in zip(candidates, shares):
            acc += s
            if r < acc:
                return c
        return candidates[-1]


__all__ = ["WeightedScheduler"]
