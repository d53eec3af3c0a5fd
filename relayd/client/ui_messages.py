"""Relay an OpenAI chat-completions stream as Vercel AI SDK UI message chunks.

A page using the AI SDK's ``useChat`` (through a transport that reads relayd) renders a stream
of ``UIMessageChunk`` objects (the ``ai`` package, ``UIMessageChunk``). :func:`ui_message_chunks`
turns what the ``openai`` package streams (``AsyncStream[ChatCompletionChunk]``, or any iterable
of those objects or of their dict forms) into them, so a Python producer relays its model's
answer in that shape::

    upstream = await openai.chat.completions.create(model=..., messages=..., stream=True)
    await producer.stream(chat_id, ui_message_chunks(upstream))

The chunks: ``start`` (``messageId``), ``start-step``, then per part ``text-start`` /
``text-delta`` / ``text-end``, ``reasoning-start`` / ``-delta`` / ``-end`` (``delta.reasoning`` or
``reasoning_content``, as OpenAI-compatible servers send reasoning), ``tool-input-start`` /
``tool-input-delta`` / ``tool-input-available`` for tool calls; then ``finish-step`` and
``finish`` (``finishReason``). If the upstream raises, ``{"type": "error", "errorText": ...}`` is
yielded and the exception raised again (so ``Producer.stream`` ends the stream ``error``).
Closing the iterator (a consumer's cancel) closes the upstream too, which stops the generation.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from relayd.client.encoding import _get
from relayd.client.upstream import aiter_of, close_upstream

__all__ = ["ui_message_chunks"]

UIMessageChunk = dict[str, Any]

# OpenAI's finish_reason -> the AI SDK's FinishReason
_FINISH = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content-filter",
    "tool_calls": "tool-calls",
    "function_call": "tool-calls",
}


@dataclass
class _ToolCall:
    id: str
    name: str
    arguments: str = ""


@dataclass
class _Message:
    """What has been said of the message so far: the parts open, the tool calls, the finish reason."""

    message_id: str | None
    started: bool = False
    open_part: str = ""  # "text", "reasoning" or ""
    parts: int = 0
    part_id: str = ""
    tools: dict[int, _ToolCall] = field(default_factory=dict)
    finish: str | None = None

    def start(self, chunk: Any) -> list[UIMessageChunk]:
        self.started = True
        message_id = self.message_id or _get(chunk, "id")
        head: UIMessageChunk = {"type": "start"}
        if isinstance(message_id, str) and message_id:
            head["messageId"] = message_id
        return [head, {"type": "start-step"}]

    def part(self, kind: str, delta: str) -> list[UIMessageChunk]:
        """A delta of a text or reasoning part, opening it (and closing the other) when needed."""
        out = []
        if self.open_part != kind:
            out += self.close_part()
            self.parts += 1
            self.part_id = f"{kind}-{self.parts}"
            self.open_part = kind
            out.append({"type": f"{kind}-start", "id": self.part_id})
        out.append({"type": f"{kind}-delta", "id": self.part_id, "delta": delta})
        return out

    def close_part(self) -> list[UIMessageChunk]:
        if not self.open_part:
            return []
        kind, self.open_part = self.open_part, ""
        return [{"type": f"{kind}-end", "id": self.part_id}]

    def tool_delta(self, call: Any) -> list[UIMessageChunk]:
        index = _get(call, "index") or 0
        function = _get(call, "function")
        name, arguments = _get(function, "name"), _get(function, "arguments")
        out: list[UIMessageChunk] = []
        tool = self.tools.get(index)
        if tool is None:
            out += self.close_part()
            call_id = _get(call, "id")
            tool = self.tools[index] = _ToolCall(call_id if isinstance(call_id, str) else f"call-{index}", name or "")
            out.append({"type": "tool-input-start", "toolCallId": tool.id, "toolName": tool.name})
        if isinstance(arguments, str) and arguments:
            tool.arguments += arguments
            out.append({"type": "tool-input-delta", "toolCallId": tool.id, "inputTextDelta": arguments})
        return out

    def end(self) -> list[UIMessageChunk]:
        out = self.close_part()
        for tool in self.tools.values():
            try:
                tool_input = json.loads(tool.arguments) if tool.arguments else {}
            except ValueError:
                tool_input = tool.arguments  # not JSON: handed over as the text the model wrote
            out.append(
                {"type": "tool-input-available", "toolCallId": tool.id, "toolName": tool.name, "input": tool_input}
            )
        finish: UIMessageChunk = {"type": "finish"}
        if self.finish is not None:
            finish["finishReason"] = _FINISH.get(self.finish, "other")
        return [*out, {"type": "finish-step"}, finish]


def _chunks_of(message: _Message, chunk: Any) -> list[UIMessageChunk]:
    """The UI message chunks one OpenAI ``chat.completion.chunk`` (object or dict) adds."""
    out = [] if message.started else message.start(chunk)
    for choice in _get(chunk, "choices") or ():
        if _get(choice, "index") not in (0, None):
            continue  # n > 1: the UI message is choice 0's
        delta = _get(choice, "delta")
        reasoning = _get(delta, "reasoning_content") or _get(delta, "reasoning")
        if isinstance(reasoning, str) and reasoning:
            out += message.part("reasoning", reasoning)
        content = _get(delta, "content")
        if isinstance(content, str) and content:
            out += message.part("text", content)
        for call in _get(delta, "tool_calls") or ():
            out += message.tool_delta(call)
        finish = _get(choice, "finish_reason")
        if isinstance(finish, str):
            message.finish = finish
    return out


async def ui_message_chunks(
    source: AsyncIterable[Any] | Iterable[Any], *, message_id: str | None = None
) -> AsyncIterator[UIMessageChunk]:
    """The AI SDK UI message chunks of an OpenAI chat-completions stream (module docstring).

    ``message_id``: the ``messageId`` of the ``start`` chunk; default: the OpenAI chunks' ``id``.
    """
    message = _Message(message_id)
    iterator = aiter_of(source)
    finished = False
    try:
        try:
            async for chunk in iterator:
                error = _get(chunk, "error")  # an error event, in a stream of dicts
                if error is not None:
                    raise RuntimeError(_get(error, "message") or str(error))
                for ui_chunk in _chunks_of(message, chunk):
                    yield ui_chunk
        except Exception as exc:
            finished = True
            yield {"type": "error", "errorText": str(exc) or type(exc).__name__}
            raise
        finished = True
        if not message.started:
            for ui_chunk in message.start(None):
                yield ui_chunk
        for ui_chunk in message.end():
            yield ui_chunk
    finally:
        if not finished:  # closed early (a consumer's cancel): stop the generation too
            await close_upstream(source, iterator)
