"""Small helpers of the original package: logging set-up, the clock, key
masking and a retry decorator.

``mask_key`` is the package's one masking rule (status, exceptions, key
reprs and the state objects all follow it): at most ``visible_chars`` of the
key's end are shown, and only when that is at most a third of the key, so a
short key is never printed nearly whole (the original's last-6 slicing
printed keys of 6 characters or fewer in full).
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from typing import Any, Awaitable, Callable, Tuple, Type, TypeVar, Union, cast

from ..exceptions import ConfigError

__all__ = ["setup_logging", "now", "mask_key", "retry_on"]

_F = TypeVar("_F", bound=Callable[..., Any])

LOG_FORMAT = "%(asctime)s %(levelname)-8s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"


def setup_logging(level: Union[str, int] = "INFO") -> None:
    """Configures the root logger (logging.basicConfig) with ISO-8601
    timestamps, as the original did. ``level`` is a level name or number;
    an unknown name is a ConfigError (a ValueError)."""
    if isinstance(level, str):
        resolved = logging.getLevelName(level.upper())
        if not isinstance(resolved, int):
            raise ConfigError(f"unknown logging level {level!r}")
        level = resolved
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt=DATE_FORMAT)


def now() -> float:
    """The monotonic clock, in seconds, that cooldowns and last_used use."""
    return time.monotonic()


def mask_key(key: str, visible_chars: int = 4) -> str:
    """``"..."`` + the last ``visible_chars`` characters of ``key`` when the key
    is at least three times that long, else ``"***"``. Never returns more of
    the key than that, whatever its length."""
    if isinstance(visible_chars, bool) or not isinstance(visible_chars, int) or visible_chars < 0:
        raise ConfigError(f"visible_chars must be an integer >= 0, not {visible_chars!r}")
    if not isinstance(key, str):
        return "***"
    if visible_chars == 0 or len(key) < 3 * visible_chars:
        return "***"
    return "..." + key[-visible_chars:]




def retry_on(*exceptions: Type[BaseException], max_retries: int = 3,
             delay: float = 0.5) -> Callable[[_F], _F]:
    """Decorator: calls the function up to ``max_retries`` times in all while it
    raises one of ``exceptions`` (default: Exception), waiting ``delay``
    seconds between attempts, then re-raises the last one. Other exceptions
    propagate at once. Works on plain functions (time.sleep between attempts)
    and on coroutine functions (asyncio.sleep: the event loop is not blocked)."""
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 1:
        raise ConfigError(f"max_retries must be an integer >= 1, not {max_retries!r}")
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0.0 <= delay < float("inf"):
        raise ConfigError(f"delay must be a finite number of seconds >= 0, not {delay!r}")
    for e in exceptions:
        if not (isinstance(e, type) and issubclass(e, BaseException)):
            raise ConfigError(f"retry_on takes exception classes, not {e!r}")
    catch: Tuple[Type[BaseException], ...] = exceptions or (Exception,)
    wait = float(delay)

    def decorate(fn: _F) -> _F:
        if inspect.iscoroutinefunction(fn):
            afn = cast(Callable[..., Awaitable[Any]], fn)

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                for attempt in range(1, max_retries + 1):
                    try:
                        return await afn(*args, **kwargs)
                    except catch:
                        if attempt == max_retries:
                            raise
                    await asyncio.sleep(wait)
                raise AssertionError("unreachable")  # pragma: no cover
            return cast(_F, async_wrapper)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for attempt in range(1, max_retries + 1):
                try:
                    return fn(*args, **kwargs)
                except catch:
                    if attempt == max_retries:
                        raise
                time.sleep(wait)
            raise AssertionError("unreachable")  # pragma: no cover
        return cast(_F, wrapper)
    return decorate
