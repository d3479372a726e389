"""status(): the C ABI's status JSON in the original package's shape.

The library returns the control protocol's status (the broker's, one shape
for embedded and attached pools); the names the original package used, and
the ones earlier KeyMesh releases added, are made here, in one place.
"""
from __future__ import annotations

from typing import Any, Dict

from .scheduler import SchedulerStrategy

# Per key: the original's name <- the protocol's.
_KEY_ALIASES = {"acquire_count": "acquires", "rate_limited_count": "rate_limited",
                "reclaimed_count": "reclaimed", "cancelled_count": "cancelled"}


def shape_status(raw: Dict[str, Any]) -> Dict[str, Any]:
    """The original's ``{"pool_metrics", "scheduler", "keys"}`` (plus KeyMesh's fields)."""
    m = raw["pool_metrics"]
    metrics = dict(m)
    metrics["uptime"] = round(m["uptime"], 2)
    metrics["uptime_seconds"] = metrics["uptime"]          # the original's name
    metrics["total_cooldowns"] = m["total_rate_limited"]    # the original's name
    metrics["total_timeouts"] = m["timeouts"]
    keys = []
    for k in raw["keys"]:
        e = dict(k)
        for alias, name in _KEY_ALIASES.items():
            e[alias] = k[name]
        e["cooldown_remaining"] = round(k["cooldown_remaining"], 2)
        e["latency_avg"] = round(k["latency_avg"], 4)
        e["health_score"] = round(k["health_score"], 4)
        keys.append(e)
    try:
        scheduler: Any = SchedulerStrategy(raw["strategy"])
    except ValueError:
        scheduler = raw["strategy"]
    return {"pool_metrics": metrics, "scheduler": scheduler, "keys": keys, "name": raw.get("name"),
            "options": raw.get("options")}
