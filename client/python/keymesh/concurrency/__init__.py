"""The original package's concurrency helper (keymesh.concurrency.semaphores)."""
from .semaphores import SemaphoreGroup

__all__ = ["SemaphoreGroup"]
