"""The original package's cooldown helper (keymesh.cooldown.manager)."""
from .manager import CooldownManager

__all__ = ["CooldownManager"]
