"""OpenAI's streaming format for relayd streams: ``GET /v1/streams/{id}/events?format=openai``.

What an OpenAI stream reader (the ``openai`` SDKs, ``eventsource-parser``, the AI SDK's
OpenAI-compatible provider) parses unchanged, specified in docs/protocol.md:

- a chunk is ``id: <cursor>`` and ``data: <chunk JSON>``; a ``text`` stream's chunk becomes a
  ``chat.completion.chunk`` whose ``choices[0].delta.content`` is the text;
- the end ``completed`` is ``data: [DONE]`` (a text stream's is preceded by a chunk with
  ``finish_reason: "stop"``); every other end, and every error, gap or reset, is an OpenAI error
  object ``data: {"error": {"message", "type", "code", "param"}}``, after which the response ends;
- no event without data: the openai SDKs keep the last ``id`` across events and dispatch a blank
  line after it as an event with empty data, which they then fail to parse as JSON. So there is
  no leading ``retry:`` block, and the keepalive is a comment line with no blank line after it.

Pure: nothing here does I/O; web/sse.py and web/whole.py use it.
"""

from __future__ import annotations

from typing import Any

import orjson

from relayd.model import Entry
from relayd.protocol import FrameCodec, format_cursor

# A comment line, without the blank line that would dispatch an (empty) event: see above.
KEEPALIVE = b": keepalive\n"
DONE = b"data: [DONE]\n"
MODEL = "relayd"  # the "model" of the chunks and completions relayd makes for text streams

# OpenAI error "type" for relayd's error codes; in-stream events of their own get theirs below.
_ERROR_TYPES = {
    "unauthorized": "authentication_error",
    "token_expired": "authentication_error",
    "forbidden": "permission_error",
    "bad_frame": "invalid_request_error",
    "invalid_stream_id": "invalid_request_error",
    "stream_not_found": "not_found_error",
    "too_many_failures": "rate_limit_error",
    "payload_too_large": "invalid_request_error",
}
# HTTP status of an error that comes before anything was streamed (docs/protocol.md).
ERROR_STATUS = {"stream_not_found": 404, "store_unavailable": 503, "shutting_down": 503, "internal": 500}
# How the stream ended, for readers of OpenAI's format: the end's error type and message.
_END_TYPES = {"error": "server_error", "producer_lost": "server_error", "cancelled": "cancelled"}
_END_MESSAGES = {
    "error": "the stream ended with an error",
    "producer_lost": "the stream's producer was lost",
    "cancelled": "the stream was cancelled",
}
_RETRY_SOON = b"retry: 1000\n"  # a reconnect fixes these at once (as in relayd's own SSE)
_RETRY_LATER = b"retry: 10000\n"
_QUICK = frozenset({"shutting_down", "token_expired"})


def error_object(code: str, message: str, kind: str | None = None, **extra: Any) -> dict[str, Any]:
    """``{"error": {...}}`` as OpenAI writes it; ``code`` is relayd's code, ``kind`` the OpenAI type."""
    body: dict[str, Any] = {
        "message": message,
        "type": kind or _ERROR_TYPES.get(code, "server_error"),
        "param": None,
        "code": code,
    }
    body.update(extra)
    return {"error": body}


def end_error(reason: str, message: str) -> dict[str, Any]:
    """The error object of a stream that ended ``error``, ``cancelled`` or ``producer_lost``."""
    return error_object(
        reason, message or _END_MESSAGES.get(reason, f"the stream ended {reason}"), _END_TYPES.get(reason)
    )


def _event(data: bytes, event_id: str | None = None, head: bytes = b"") -> bytes:
    tail = b"id: %s\n\n" % event_id.encode() if event_id is not None else b"\n"
    return head + b"data: " + data + b"\n" + tail


def text_chunk(stream: str, gen: int, content: str | None, *, first: bool = False, finish: str | None = None) -> bytes:
    """A ``chat.completion.chunk`` carrying ``content`` (or, with ``finish``, the finish reason)."""
    delta: dict[str, Any] = {}
    if first:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return orjson.dumps(
        {"id": stream, "object": "chat.completion.chunk", "created": gen // 1000, "model": MODEL, "choices": [choice]}
    )


class OpenAiSseCodec(FrameCodec):
    """OpenAI's SSE format (module docstring). Stateless, one instance, like the other codecs."""

    kind = "openai_sse"

    def entries(self, stream: str, gen: int, entries: list[Entry], text: bool) -> bytes:
        parts: list[bytes] = []
        gen_b = str(gen).encode()
        for entry in entries:
            if entry.data is not None:
                data = entry.data
                if text:
                    value = orjson.loads(data)
                    # a text stream's entry that is not a string (see encode_sse_entries): its JSON text
                    content = value if isinstance(value, str) else data.decode()
                    data = text_chunk(stream, gen, content, first=entry.offset == 1)
                parts.append(b"".join((b"id: ", gen_b, b"-%010d" % entry.offset, b"\ndata: ", data, b"\n\n")))
                continue
            cursor = format_cursor(gen, entry.offset)
            if entry.reason == "completed":
                if text:
                    parts.append(_event(text_chunk(stream, gen, None, first=entry.offset == 1, finish="stop")))
                parts.append(DONE + b"id: %s\n\n" % cursor.encode())
            else:
                parts.append(_event(orjson.dumps(end_error(entry.reason or "error", entry.message)), cursor))
        return b"".join(parts)

    def chunk_template(self, stream: str, gen: int, text: bool) -> bytes | None:
        # entries' event of a JSON stream's chunk (its data the stored JSON), the offset already
        # formatted; a text stream's events are chat.completion.chunk objects made here: None
        return None if text else b"id: %d-" % gen + b"%s\ndata: %s\n\n"

    def framed(self, stream: str, gen: int, frames: list[bytes], end: Entry | None, text: bool) -> bytes:
        events = b"".join(frames)
        return events + self.entries(stream, gen, [end], text) if end is not None else events

    def error(self, stream: str, code: str, message: str) -> bytes:
        retry = _RETRY_SOON if code in _QUICK else _RETRY_LATER
        return _event(orjson.dumps(error_object(code, message)), head=retry)

    def gap(self, stream: str, gen: int, had: int, next_offset: int) -> bytes:
        # The id is the cursor just before the entries that follow the gap: a reconnect with it
        # (EventSource's Last-Event-ID) continues after the gap, which this event reported.
        cursor, after = format_cursor(gen, had), format_cursor(gen, next_offset)
        message = f"entries after {cursor} are gone (trimmed or expired); the stream continues at {after}"
        body = error_object("gap", message, "stream_gap", cursor=cursor, next=after)
        return _event(orjson.dumps(body), format_cursor(gen, next_offset - 1), _RETRY_SOON)

    def reset(self, stream: str, reason: str) -> bytes:
        # An empty id clears the reader's last event id: a reconnect reads the stream from its start.
        message = f"the stream was {'replaced' if reason == 'stream_replaced' else 'partly lost'}; read it again"
        return _event(orjson.dumps(error_object("reset", message, "stream_reset", reason=reason)), "", _RETRY_SOON)


OPENAI_SSE_CODEC = OpenAiSseCodec()


def error_of(event: bytes) -> dict[str, Any] | None:
    """The ``error`` object of an error event this codec made (its ``data:`` line), else None."""
    start = event.find(b"data: {")
    if start < 0:
        return None
    try:
        body = orjson.loads(event[start + 6 : event.index(b"\n", start)])
    except orjson.JSONDecodeError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) and isinstance(error.get("code"), str) else None


# -- the whole stream as one chat.completion (GET /v1/streams/{id}/whole?format=openai) ------------


def completion(stream: str, gen: int, chunks: list[Any], text: bool, completed: bool) -> dict[str, Any]:
    """The ``chat.completion`` the chunks add up to, as OpenAI answers a request with ``stream=false``.

    A text stream's chunks are its content. A json stream's ``chat.completion.chunk`` objects are
    merged as the openai SDKs merge them: per choice, the role, the content and refusal
    concatenated, the tool calls' arguments concatenated by index, the last finish reason; the
    first chunk's id, created, model and system_fingerprint; the usage chunk's usage. A string
    chunk in a json stream is content of choice 0; other values are skipped.
    """
    head: dict[str, Any] = {"id": stream, "object": "chat.completion", "created": gen // 1000, "model": MODEL}
    choices: dict[int, dict[str, Any]] = {}
    usage = None

    def choice(index: int) -> dict[str, Any]:
        if index not in choices:
            message = {"role": "assistant", "content": None, "refusal": None}
            choices[index] = {"index": index, "message": message, "logprobs": None, "finish_reason": None}
        return choices[index]

    def add(message: dict[str, Any], field: str, value: Any) -> None:
        if isinstance(value, str):
            message[field] = (message[field] or "") + value

    first = True
    for chunk in chunks:
        if isinstance(chunk, str):
            add(choice(0)["message"], "content", chunk)
            continue
        if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
            continue
        if first:
            first = False
            for key in ("id", "created", "model", "system_fingerprint"):
                if chunk.get(key) is not None:
                    head[key] = chunk[key]
        if chunk.get("usage") is not None:
            usage = chunk["usage"]
        for part in chunk["choices"]:
            if not isinstance(part, dict) or not isinstance(part.get("index", 0), int):
                continue
            merged = choice(part.get("index", 0))
            delta = part.get("delta")
            if not isinstance(delta, dict):
                delta = {}
            message = merged["message"]
            if isinstance(delta.get("role"), str):
                message["role"] = delta["role"]
            add(message, "content", delta.get("content"))
            add(message, "refusal", delta.get("refusal"))
            for call in delta.get("tool_calls") or ():
                _merge_tool_call(message, call)
            if part.get("finish_reason") is not None:
                merged["finish_reason"] = part["finish_reason"]
    zero = choice(0)
    if text and zero["message"]["content"] is None:
        zero["message"]["content"] = ""
    if completed:
        for merged in choices.values():
            merged["finish_reason"] = merged["finish_reason"] or "stop"
    return {**head, "choices": [choices[i] for i in sorted(choices)], "usage": usage}


def _merge_tool_call(message: dict[str, Any], call: Any) -> None:
    if not isinstance(call, dict) or not isinstance(call.get("index", 0), int):
        return
    calls: list[dict[str, Any]] = message.setdefault("tool_calls", [])
    index = call.get("index", 0)
    while len(calls) <= index:
        calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
    merged = calls[index]
    if isinstance(call.get("id"), str):
        merged["id"] = call["id"]
    function = call.get("function")
    if isinstance(function, dict):
        for key in ("name", "arguments"):
            if isinstance(function.get(key), str):
                merged["function"][key] += function[key]
