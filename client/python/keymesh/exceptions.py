"""KeyMesh's exception hierarchy (the original's names, plus the new errors).

Exceptions never carry a raw secret: ``key`` is the masked secret
("...abcd") and ``key_name`` the key's stable name when known.
"""
from __future__ import annotations

from typing import Any, Optional


class KeyMeshError(Exception):
    """Base class of every KeyMesh error. ``code`` is the C ABI status code."""

    code: Optional[int] = None

    def __init__(self, message: str = "", *, code: Optional[int] = None,
                 key: Optional[str] = None, key_name: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.key = key
        self.key_name = key_name

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


class NoAvailableKeyError(KeyMeshError):
    """No key became available before the acquire timeout."""

    def __init__(self, message: str = ("No API keys are currently available. All keys are "
                                       "either cooling down or exhausted."), **kw: Any) -> None:
        super().__init__(message, **kw)


class KeyExhaustedError(KeyMeshError):
    """mark_failed() made the key reach max_failures (raised once, at the threshold).

    The key stays in the pool, out of rotation, until add_key()/reset.
    """


class KeyCooldownError(KeyMeshError):
    """Kept for compatibility with the original package (never raised there either)."""

    def __init__(self, key: str = "", cooldown_remaining: float = 0.0, **kw: Any) -> None:
        from ._lib import mask_secret
        masked = mask_secret(key)
        super().__init__(f"Key {masked} is in cooldown for {cooldown_remaining:.1f}s more.",
                         key=masked, **kw)
        self.cooldown_remaining = cooldown_remaining


class UnknownKeyError(KeyMeshError, KeyError):
    """The key is not in this pool (also a KeyError, as the original raised)."""


class KeyNotHeldError(KeyMeshError):
    """This process does not hold the key (double release, or acquired elsewhere)."""


class BrokerUnavailableError(KeyMeshError):
    """The keymesh-broker socket cannot be reached."""


class ConfigError(KeyMeshError, ValueError):
    """Invalid configuration or argument (also a ValueError)."""


class ProtocolError(KeyMeshError):
    """Malformed or unexpected control-protocol message."""


class PoolClosedError(KeyMeshError):
    """The pool was closed (or the wait was cancelled by close())."""


class CapacityError(KeyMeshError):
    """A fixed capacity of the shared segment would be exceeded."""
