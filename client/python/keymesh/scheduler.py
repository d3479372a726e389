"""Scheduling strategies.

Selection runs inside the shared segment under the pool's process-shared
lock, so only the built-in strategies exist; the scheduler classes are kept
for compatibility with the original package and only name a strategy.
"""
from __future__ import annotations

import enum
from typing import Any, Union


class SchedulerStrategy(str, enum.Enum):
    ROUND_ROBIN = "round_robin"
    LEAST_BUSY = "least_busy"
    WEIGHTED = "weighted"

    def __str__(self) -> str:
        return self.value


class BaseScheduler:
    """Names a built-in strategy. Custom ``select`` methods are not supported."""

    strategy: SchedulerStrategy = SchedulerStrategy.LEAST_BUSY


class RoundRobinScheduler(BaseScheduler):
    strategy = SchedulerStrategy.ROUND_ROBIN


class LeastBusyScheduler(BaseScheduler):
    strategy = SchedulerStrategy.LEAST_BUSY


class WeightedScheduler(BaseScheduler):
    strategy = SchedulerStrategy.WEIGHTED


def parse_strategy(value: Union[str, SchedulerStrategy, Any]) -> SchedulerStrategy:
    from .exceptions import ConfigError
    try:
        return SchedulerStrategy(value.value if isinstance(value, enum.Enum) else value)
    except ValueError:
        raise ConfigError(f"unknown strategy {value!r}: expected one of "
                          f"{', '.join(s.value for s in SchedulerStrategy)}") from None


def build_scheduler(strategy: Union[str, SchedulerStrategy]) -> BaseScheduler:
    s = parse_strategy(strategy)
    return {SchedulerStrategy.ROUND_ROBIN: RoundRobinScheduler,
            SchedulerStrategy.LEAST_BUSY: LeastBusyScheduler,
            SchedulerStrategy.WEIGHTED: WeightedScheduler}[s]()


def strategy_of_scheduler(scheduler: Any) -> SchedulerStrategy:
    from .exceptions import ConfigError
    if type(scheduler) in (RoundRobinScheduler, LeastBusyScheduler, WeightedScheduler):
        return scheduler.strategy
    strategy = getattr(scheduler, "strategy", None)
    if strategy is not None and getattr(type(scheduler), "select", None) is None:
        return parse_strategy(strategy)
    raise ConfigError("custom schedulers cannot run in KeyMesh's shared pool; pass strategy= "
                      "(round_robin, least_busy or weighted) or a built-in scheduler")
