"""OpenAIHandler / AsyncOpenAIHandler: httpx clients that draw an API key
from a KeyMesh pool for every request and report its outcome.

Each request: acquire a key, set ``Authorization: Bearer <key>`` on that
request only (never logged), send, then map the outcome (the original's
mapping, with its defect 25 fixed):

- the provider's rate-limit headers (``x-ratelimit-*``, ``retry-after``,
  ``retry-after-ms``, and Anthropic's ``anthropic-ratelimit-*``, translated)
  go to ``pool.observe_limits`` so every process paces the key by them;
- 429: ``mark_rate_limited`` for ``retry-after-ms`` or ``Retry-After``
  (seconds or an HTTP-date), else the pool's default cooldown;
- 401/403: ``mark_failed(permanent=True)`` (the key is revoked);
- 5xx: ``mark_failed``;
- a transport exception: ``mark_failed``, and the exception propagates;
- a BaseException (a cancelled task, KeyboardInterrupt): ``cancel``, no outcome;
- anything else: ``release`` with the latency and, for a JSON body,
  ``usage.total_tokens``. A streamed response reports when it is closed
  (latency up to then; a failure if reading it raised).

There is no retry with another key: a 429 or 5xx response is returned to the
caller, as in the original. This module needs httpx; ``import keymesh`` does
not import it (keymesh.OpenAIHandler imports this module on first use).
"""
from __future__ import annotations

import datetime
import json
import logging
import time
from typing import (Any, AsyncIterator, Awaitable, Callable, Iterator, List, Optional, Sequence, Tuple, Type, TypeVar,
                    Union)

try:
    import httpx
except ImportError as e:  # pragma: no cover - exercised only without httpx
    raise ImportError("keymesh.OpenAIHandler and AsyncOpenAIHandler need httpx "
                      "(Debian: apt install python3-httpx; else pip install httpx)") from e

from .._core import parse_retry_after
from ..exceptions import ConfigError, KeyExhaustedError, KeyMeshError, KeyNotHeldError
from .. import KeyPool, SyncKeyPool  # the package's names: the pool modules move into keymesh.pool
from ..scheduler import SchedulerStrategy
from ..utils.helpers import mask_key

__all__ = ["OpenAIHandler", "AsyncOpenAIHandler", "limit_headers", "outcome_of"]

log = logging.getLogger("keymesh.integrations")

# The C ABI's header names (client/rate_limit_headers.cc), passed as they are.
_NATIVE = frozenset({"x-ratelimit-limit-requests", "x-ratelimit-limit-tokens", "x-ratelimit-remaining-requests",
                     "x-ratelimit-remaining-tokens", "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens",
                     "retry-after", "retry-after-ms"})
# Anthropic's names -> the C ABI's; their resets are RFC 3339 instants.
_ANTHROPIC = {"anthropic-ratelimit-requests-limit": "x-ratelimit-limit-requests",
              "anthropic-ratelimit-requests-remaining": "x-ratelimit-remaining-requests",
              "anthropic-ratelimit-requests-reset": "x-ratelimit-reset-requests",
              "anthropic-ratelimit-tokens-limit": "x-ratelimit-limit-tokens",
              "anthropic-ratelimit-tokens-remaining": "x-ratelimit-remaining-tokens",
              "anthropic-ratelimit-tokens-reset": "x-ratelimit-reset-tokens"}

# Outcomes.
SUCCESS, RATE_LIMITED, FAILED, REVOKED = "success", "rate_limited", "failed", "revoked"
MAX_TOKENS = (1 << 64) - 1


def _reset_in(value: str) -> str:
    """An RFC 3339 instant as the seconds from now the C ABI takes ("12.5");
    a value that is already a duration is passed on for the C ABI to check."""
    v = value.strip()
    try:
        when = datetime.datetime.fromisoformat(v.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return v
    if when.tzinfo is None:
        raise ConfigError(f"malformed {value[:40]!r} reset instant: no time zone")
    secs = (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    return f"{max(0.0, secs):.3f}"


def limit_headers(headers: "httpx.Headers") -> List[Tuple[str, str]]:
    """The rate-limit headers of a response, named as observe_limits takes them."""
    out: List[Tuple[str, str]] = []
    for name, value in headers.multi_items():
        lname = name.lower()
        if lname in _NATIVE:
            out.append((lname, value))
        elif lname in _ANTHROPIC:
            mapped = _ANTHROPIC[lname]
            out.append((mapped, _reset_in(value) if mapped.startswith("x-ratelimit-reset") else value))
    return out


def _cooldown(headers: "httpx.Headers") -> Optional[float]:
    """A 429's cooldown: retry-after-ms, else Retry-After (seconds or an
    HTTP-date), else None (the pool's default). A malformed value is logged
    and falls back to the default."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            v = float(ms.strip())
            if v == v and 0.0 <= v < float("inf"):
                return v / 1000.0
        except ValueError:
            pass
        log.warning("keymesh: ignoring a malformed retry-after-ms header")
    ra = headers.get("retry-after")
    if ra is not None:
        try:
            return parse_retry_after(ra)
        except KeyMeshError:
            log.warning("keymesh: ignoring a malformed Retry-After header")
    return None


def outcome_of(status_code: int) -> str:
    """The outcome a response status means (see the module docstring)."""
    if status_code == 429:
        return RATE_LIMITED
    if status_code in (401, 403):
        return REVOKED
    if status_code >= 500:
        return FAILED
    return SUCCESS


def _usage_tokens(response: "httpx.Response") -> int:
    """``usage.total_tokens`` of a JSON body, 0 when absent or not a count."""
    if "json" not in response.headers.get("content-type", ""):
        return 0
    try:
        body = json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        return 0
    usage = body.get("usage") if isinstance(body, dict) else None
    n = usage.get("total_tokens") if isinstance(usage, dict) else None
    if isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_TOKENS:
        return n
    return 0


class _Report:
    """The outcome calls of one request, made at most once in all."""

    __slots__ = ("key", "start", "done")

    def __init__(self, key: str) -> None:
        self.key = key
        self.start = time.monotonic()
        self.done = False

    def take(self) -> bool:
        if self.done:
            return False
        self.done = True
        return True


def _quietly(what: str, key: str, exc: BaseException) -> None:
    """An outcome call failed: logged (masked), never raised over the response."""
    if isinstance(exc, KeyNotHeldError):
        return  # the caller already reported this lease
    if isinstance(exc, KeyExhaustedError):
        log.warning("%s", exc)
        return
    log.warning("keymesh: could not report %s for key %s: %s", what, mask_key(key), exc)


_P = TypeVar("_P", SyncKeyPool, KeyPool)


def _handler_pool(owner: str, cls: Type[_P], keys: Optional[Sequence[Any]], pool: Optional[_P],
                  close_pool: Optional[bool], strategy: Union[str, SchedulerStrategy], default_cooldown: float,
                  max_failures: int, acquire_timeout: float) -> Tuple[_P, bool]:
    """A handler's pool (the one given, or an embedded one built from
    ``keys``) and whether the handler closes it."""
    if (keys is None) == (pool is None):
        raise ConfigError(f"{owner} takes either keys or pool=, not both or neither")
    if pool is not None and not isinstance(pool, cls):
        raise ConfigError(f"{owner} needs a {cls.__name__}, not {type(pool).__name__}")
    made = pool if pool is not None else cls(keys if keys is not None else [], strategy=strategy,
                                             default_cooldown=default_cooldown, max_failures=max_failures,
                                             acquire_timeout=acquire_timeout)
    return made, pool is None if close_pool is None else bool(close_pool)


def _observe(pool: Union[SyncKeyPool, KeyPool], report: _Report, response: "httpx.Response") -> None:
    """Feeds the response's rate-limit headers to the pool (a plain call in
    both pools: it never waits). A malformed one is logged; the response and
    its outcome stand."""
    try:
        headers = limit_headers(response.headers)
        if headers:
            pool.observe_limits(report.key, headers)
    except KeyMeshError as e:
        _quietly("rate-limit headers", report.key, e)


# ---------------------------------------------------------------------------
class _SyncStream(httpx.SyncByteStream):
    """A streamed body that reports the outcome when it is closed."""

    def __init__(self, inner: "httpx.SyncByteStream", finish: Callable[[bool], None]) -> None:
        self._inner = inner
        self._finish = finish
        self._failed = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._inner
        except Exception:
            self._failed = True
            raise

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._finish(self._failed)


class _AsyncStream(httpx.AsyncByteStream):
    def __init__(self, inner: "httpx.AsyncByteStream", finish: Callable[[bool], Awaitable[None]]) -> None:
        self._inner = inner
        self._finish = finish
        self._failed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        except Exception:
            self._failed = True
            raise

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            await self._finish(self._failed)


class OpenAIHandler(httpx.Client):
    """An httpx.Client over a SyncKeyPool::

        with OpenAIHandler(["sk-a", "sk-b"], base_url="https://api.openai.com/v1") as client:
            r = client.post("/chat/completions", json={...})

    ``keys`` and the pool options build an embedded SyncKeyPool the handler
    owns; or pass ``pool=`` (e.g. ``SyncKeyPool.connect("openai")``), which
    the handler closes only if ``close_pool=True``. Other keyword arguments
    go to httpx.Client.
    """

    def __init__(self, keys: Optional[Sequence[Any]] = None, *,
                 strategy: Union[str, SchedulerStrategy] = SchedulerStrategy.LEAST_BUSY,
                 default_cooldown: float = 60.0, max_failures: int = 10, acquire_timeout: float = 30.0,
                 pool: Optional[SyncKeyPool] = None, close_pool: Optional[bool] = None,
                 **httpx_kwargs: Any) -> None:
        self._km_pool, self._km_close_pool = _handler_pool("OpenAIHandler", SyncKeyPool, keys, pool, close_pool,
                                                           strategy, default_cooldown, max_failures,
                                                           acquire_timeout)
        try:
            super().__init__(**httpx_kwargs)
        except BaseException:
            if self._km_close_pool:
                self._km_pool.close()
            raise

    @property
    def pool(self) -> SyncKeyPool:
        return self._km_pool

    def send(self, request: "httpx.Request", *, stream: bool = False, **kwargs: Any) -> "httpx.Response":
        key = self._km_pool.acquire()
        request.headers["Authorization"] = f"Bearer {key}"
        report = _Report(key)
        try:
            response = super().send(request, stream=True, **kwargs)
        except Exception:
            self._end(report, FAILED, None)
            raise
        except BaseException:
            self._cancel(report)
            raise
        outcome = outcome_of(response.status_code)
        self._observe(report, response)
        if outcome != SUCCESS:
            self._end(report, outcome, response)
        if not stream:
            try:
                response.read()
            except Exception:
                self._end(report, FAILED, None)
                raise
            except BaseException:
                self._cancel(report)
                raise
            finally:
                response.close()
            self._end(report, SUCCESS, response)
        elif outcome == SUCCESS:
            assert isinstance(response.stream, httpx.SyncByteStream)
            response.stream = _SyncStream(response.stream,
                                          lambda failed: self._end(report, FAILED if failed else SUCCESS, None))
        return response

    def _observe(self, report: _Report, response: "httpx.Response") -> None:
        _observe(self._km_pool, report, response)

    def _end(self, report: _Report, outcome: str, response: Optional["httpx.Response"]) -> None:
        if not report.take():
            return
        pool, key = self._km_pool, report.key
        try:
            if outcome == SUCCESS:
                tokens = _usage_tokens(response) if response is not None else 0
                pool.release(key, latency=time.monotonic() - report.start, tokens=tokens)
            elif outcome == RATE_LIMITED:
                assert response is not None
                pool.mark_rate_limited(key, cooldown=_cooldown(response.headers))
            else:
                pool.mark_failed(key, permanent=outcome == REVOKED)
        except KeyMeshError as e:
            _quietly(outcome, key, e)

    def _cancel(self, report: _Report) -> None:
        if report.take():
            try:
                self._km_pool.cancel(report.key)
            except KeyMeshError as e:
                _quietly("a cancel", report.key, e)

    def close(self) -> None:
        """Closes the HTTP client, then the pool (if the handler owns it)."""
        try:
            super().close()
        finally:
            if self._km_close_pool:
                self._km_pool.close()


class AsyncOpenAIHandler(httpx.AsyncClient):
    """OpenAIHandler over httpx.AsyncClient and a KeyPool (``await aclose()``)."""

    def __init__(self, keys: Optional[Sequence[Any]] = None, *,
                 strategy: Union[str, SchedulerStrategy] = SchedulerStrategy.LEAST_BUSY,
                 default_cooldown: float = 60.0, max_failures: int = 10, acquire_timeout: float = 30.0,
                 pool: Optional[KeyPool] = None, close_pool: Optional[bool] = None,
                 **httpx_kwargs: Any) -> None:
        self._km_pool, self._km_close_pool = _handler_pool("AsyncOpenAIHandler", KeyPool, keys, pool, close_pool,
                                                           strategy, default_cooldown, max_failures,
                                                           acquire_timeout)
        try:
            super().__init__(**httpx_kwargs)
        except BaseException:
            if self._km_close_pool:
                self._km_pool._core.close()
            raise

    @property
    def pool(self) -> KeyPool:
        return self._km_pool

    async def send(self, request: "httpx.Request", *, stream: bool = False, **kwargs: Any) -> "httpx.Response":
        key = await self._km_pool.acquire()
        request.headers["Authorization"] = f"Bearer {key}"
        report = _Report(key)
        try:
            response = await super().send(request, stream=True, **kwargs)
        except Exception:
            await self._end(report, FAILED, None)
            raise
        except BaseException:
            await self._cancel(report)
            raise
        outcome = outcome_of(response.status_code)
        self._observe(report, response)
        if outcome != SUCCESS:
            await self._end(report, outcome, response)
        if not stream:
            try:
                await response.aread()
            except Exception:
                await self._end(report, FAILED, None)
                raise
            except BaseException:
                await self._cancel(report)
                raise
            finally:
                await response.aclose()
            await self._end(report, SUCCESS, response)
        elif outcome == SUCCESS:
            assert isinstance(response.stream, httpx.AsyncByteStream)

            async def finish(failed: bool) -> None:
                await self._end(report, FAILED if failed else SUCCESS, None)
            response.stream = _AsyncStream(response.stream, finish)
        return response

    def _observe(self, report: _Report, response: "httpx.Response") -> None:
        _observe(self._km_pool, report, response)

    async def _end(self, report: _Report, outcome: str, response: Optional["httpx.Response"]) -> None:
        if not report.take():
            return
        pool, key = self._km_pool, report.key
        try:
            if outcome == SUCCESS:
                tokens = _usage_tokens(response) if response is not None else 0
                await pool.release(key, latency=time.monotonic() - report.start, tokens=tokens)
            elif outcome == RATE_LIMITED:
                assert response is not None
                await pool.mark_rate_limited(key, cooldown=_cooldown(response.headers))
            else:
                await pool.mark_failed(key, permanent=outcome == REVOKED)
        except KeyMeshError as e:
            _quietly(outcome, key, e)

    async def _cancel(self, report: _Report) -> None:
        if report.take():
            try:
                await self._km_pool.cancel(report.key)
            except KeyMeshError as e:
                _quietly("a cancel", report.key, e)

    async def aclose(self) -> None:
        """Closes the HTTP client, then the pool (if the handler owns it)."""
        try:
            await super().aclose()
        finally:
            if self._km_close_pool:
                await self._km_pool.close()
