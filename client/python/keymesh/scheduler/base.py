"""BaseScheduler, SchedulerStrategy and build_scheduler.

The built-in schedulers (round_robin, least_busy, weighted) run natively:
passing one to a pool selects that strategy inside the shared segment, under
the pool's lock, at native speed. Their ``select`` also works when called
directly on views.

A subclass that overrides ``select`` runs the user's code, never under the
segment's lock: the pool takes a snapshot of its keys, calls
``select(candidates)`` with a read-only KeyView (keymesh.scheduler.view) per
eligible key, and acquires exactly the chosen key if it is still eligible
(else it retries with a fresh snapshot, a bounded number of times, and then
falls back to the pool's strategy, saying so once in the log).
``select`` returns one of the candidates, or None for "no key now" (the
acquire then waits for a change and asks again, until its timeout).
Returning anything else is a KeyMeshError; an exception from ``select``
propagates out of acquire.
"""
from __future__ import annotations

import abc
import enum
from typing import Any, Optional, Sequence, Tuple, Union

from .view import KeyView


class SchedulerStrategy(str, enum.Enum):
    ROUND_ROBIN = "round_robin"
    LEAST_BUSY = "least_busy"
    WEIGHTED = "weighted"

    def __str__(self) -> str:
        return self.value


class BaseScheduler(abc.ABC):
    """The original's scheduler ABC: a stateless selector.

    ``strategy`` names the built-in strategy the scheduler is (or, for a
    custom one, the pool's strategy it falls back to). ``select`` must not
    change anything and must return one of ``candidates`` or None; it may be
    called from several threads and processes at once.
    """

    strategy: SchedulerStrategy = SchedulerStrategy.LEAST_BUSY

    @abc.abstractmethod
    def select(self, candidates: Sequence[KeyView]) -> Optional[KeyView]:
        """One of ``candidates`` (each eligible now), or None."""


def parse_strategy(value: Union[str, SchedulerStrategy, Any]) -> SchedulerStrategy:
    from ..exceptions import ConfigError
    try:
        return SchedulerStrategy(value.value if isinstance(value, enum.Enum) else value)
    except ValueError:
        raise ConfigError(f"unknown strategy {value!r}: expected one of "
                          f"{', '.join(s.value for s in SchedulerStrategy)}") from None


def build_scheduler(strategy: Union[str, SchedulerStrategy]) -> BaseScheduler:
    """The built-in scheduler of ``strategy``; ConfigError (a ValueError) if unknown."""
    from .least_busy import LeastBusyScheduler
    from .round_robin import RoundRobinScheduler
    from .weighted import WeightedScheduler
    s = parse_strategy(strategy)
    classes = {SchedulerStrategy.ROUND_ROBIN: RoundRobinScheduler,
               SchedulerStrategy.LEAST_BUSY: LeastBusyScheduler,
               SchedulerStrategy.WEIGHTED: WeightedScheduler}
    scheduler: BaseScheduler = classes[s]()
    return scheduler


def resolve_scheduler(scheduler: Any) -> Tuple[SchedulerStrategy, Optional[BaseScheduler]]:
    """(the native strategy, the scheduler whose Python ``select`` must run, or
    None). A built-in scheduler, or a subclass that keeps a built-in's
    ``select``, is its native strategy; an object with only a ``strategy``
    (no ``select``) names one; anything with its own ``select`` is custom."""
    from ..exceptions import ConfigError
    from .least_busy import LeastBusyScheduler
    from .round_robin import RoundRobinScheduler
    from .weighted import WeightedScheduler
    select = getattr(type(scheduler), "select", None)
    native = {RoundRobinScheduler.select: SchedulerStrategy.ROUND_ROBIN,
              LeastBusyScheduler.select: SchedulerStrategy.LEAST_BUSY,
              WeightedScheduler.select: SchedulerStrategy.WEIGHTED}
    if select is not None and select in native:
        return native[select], None
    strategy = getattr(scheduler, "strategy", SchedulerStrategy.LEAST_BUSY)
    if select is None:
        if getattr(scheduler, "strategy", None) is None:
            raise ConfigError(f"scheduler must be a BaseScheduler (with select or strategy), "
                              f"not {type(scheduler).__name__}")
        return parse_strategy(strategy), None
    if not callable(select):
        raise ConfigError(f"{type(scheduler).__name__}.select is not callable")
    return parse_strategy(strategy), scheduler


def strategy_of_scheduler(scheduler: Any) -> SchedulerStrategy:
    """The native strategy a scheduler selects (kept for callers of the old
    module; a custom scheduler gives its fallback strategy)."""
    return resolve_scheduler(scheduler)[0]


__all__ = ["SchedulerStrategy", "BaseScheduler", "build_scheduler", "parse_strategy", "resolve_scheduler",
           "strategy_of_scheduler"]
