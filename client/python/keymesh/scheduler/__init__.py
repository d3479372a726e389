"""Scheduling: the strategies (run natively in the shared pool) and
BaseScheduler, whose subclasses may choose keys in Python (see base.py)."""
from .base import (BaseScheduler, SchedulerStrategy, build_scheduler, parse_strategy, resolve_scheduler,
                   strategy_of_scheduler)
from .least_busy import LeastBusyScheduler
from .round_robin import RoundRobinScheduler
from .view import KeyView
from .weighted import WeightedScheduler

__all__ = ["BaseScheduler", "SchedulerStrategy", "build_scheduler", "parse_strategy", "resolve_scheduler",
           "strategy_of_scheduler", "RoundRobinScheduler", "LeastBusyScheduler", "WeightedScheduler", "KeyView"]
