"""Encoders: turn what an upstream yields (SDK chunk objects, dataclasses, text) into chunks.

An encoder is ``encoder(item) -> JSON value | str | None``. ``None`` or ``""`` means "nothing to
send for this item" (an OpenAI chunk carrying only a role or a finish reason, say), so streams
hold no empty chunks. The Producer picks :func:`json_encoder` for ``json`` streams and
:func:`text_encoder` for ``text`` streams unless told otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

__all__ = ["Encoder", "default_encoder", "json_encoder", "text_encoder"]

Encoder = Callable[[Any], Any]


def json_encoder(item: Any) -> Any:
    """A JSON-able value for ``item``.

    Pydantic models (the OpenAI and Anthropic SDKs' chunk and event objects) become
    ``model_dump(mode="json", exclude_unset=True)``: for an object the SDK parsed from the model's
    response, the fields the model sent, nulls included (``"finish_reason": null`` is how
    OpenAI's format says "not the last chunk"), and no field it did not send. Dataclass instances
    become ``dataclasses.asdict``; anything else is passed on as is (and must be
    JSON-serialisable).
    """
    dump = getattr(item, "model_dump", None)
    if callable(dump) and not isinstance(item, type):
        return dump(mode="json", exclude_unset=True)
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return dataclasses.asdict(item)
    return item


def _get(obj: Any, name: str) -> Any:
    """``obj.name`` or ``obj[name]``: SDK objects and their plain-dict forms read alike."""
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def text_encoder(item: Any) -> str:
    """The text of ``item``, for ``content_type="text"`` streams.

    - ``str``: itself;
    - an OpenAI chat-completion chunk (``choices[0].delta.content``): the delta text, ``""``
      when the chunk carries none (role-only and finish chunks, tool-call deltas);
    - an OpenAI Responses event ``response.output_text.delta``: its ``delta``; other Responses
      events (``response.*``): ``""``;
    - an Anthropic ``content_block_delta`` event with a text delta: its text; other Anthropic
      stream events (``message_start``, ``content_block_stop``, ...): ``""``;
    - anything else: ``str(item)``.

    Objects and their dict forms (``model_dump()``) are read the same way.
    """
    if isinstance(item, str):
        return item
    choices = _get(item, "choices")
    if isinstance(choices, list | tuple) and _get(item, "object") in ("chat.completion.chunk", None):
        if not choices:
            return ""
        content = _get(_get(choices[0], "delta"), "content")
        return content if isinstance(content, str) else ""
    kind = _get(item, "type")
    if isinstance(kind, str):
        if kind == "response.output_text.delta":
            delta = _get(item, "delta")
            return delta if isinstance(delta, str) else ""
        if kind == "content_block_delta":
            text = _get(_get(item, "delta"), "text")
            return text if isinstance(text, str) else ""
        if kind.startswith("response.") or kind in _ANTHROPIC_EVENTS:
            return ""
    return str(item)


_ANTHROPIC_EVENTS = frozenset(
    {"message_start", "message_delta", "message_stop", "content_block_start", "content_block_stop", "ping"}
)


def default_encoder(content_type: str) -> Encoder:
    """The encoder a stream of ``content_type`` uses when none is given."""
    return text_encoder if content_type == "text" else json_encoder
