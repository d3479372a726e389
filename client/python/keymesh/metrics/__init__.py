"""The original package's metrics (keymesh.metrics.pool_metrics)."""
from .pool_metrics import PoolMetrics

__all__ = ["PoolMetrics"]
