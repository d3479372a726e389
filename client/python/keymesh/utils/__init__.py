"""The original package's utilities (keymesh.utils.helpers)."""
from .helpers import mask_key, now, retry_on, setup_logging

__all__ = ["setup_logging", "now", "mask_key", "retry_on"]
