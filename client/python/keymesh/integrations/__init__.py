"""Integrations with HTTP clients. ``OpenAIHandler`` and ``AsyncOpenAIHandler``
(keymesh.integrations.openai_handler) need httpx, imported on first use."""
from typing import Any

__all__ = ["OpenAIHandler", "AsyncOpenAIHandler"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import openai_handler
        return getattr(openai_handler, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
