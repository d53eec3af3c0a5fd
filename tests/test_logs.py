"""relayd's logs: one open and one close line per connection, three formats, never a secret."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relayd.config import LogConfig, build_config
from relayd.errors import ConfigError
from relayd.logs import (
    FORMATTERS,
    JsonFormatter,
    LogfmtFormatter,
    RateLimit,
    TextFormatter,
    install_redaction,
    redact,
    setup_logging,
)
from relayd.metrics import Metrics
from relayd.web.http_log import BAD_REQUEST_LINES_PER_S, RequestErrorLog
from tests.helpers import API_KEY, JWT_SECRET, Relayd, collect_chunks

_LOGFMT_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')
CLOSE_FIELDS = {"role", "remote", "conn", "duration_s", "streams", "close_code", "close_reason"}


def parse_logfmt(line: str) -> dict[str, str]:
    pairs = {}
    for key, raw in _LOGFMT_PAIR.findall(line):
        pairs[key] = json.loads(raw) if raw.startswith('"') else raw
    return pairs


def connection_lines(records: list[logging.LogRecord], role: str, what: str) -> list[logging.LogRecord]:
    return [r for r in records if getattr(r, "role", None) == role and r.getMessage().startswith(f"{role} {what} ")]


async def wait_for_lines(caplog: pytest.LogCaptureFixture, *wanted: tuple[str, str]) -> None:
    """Poll the captured records (a close line is written after the peer is gone: no event to wait on)."""
    deadline = time.monotonic() + 10.0
    while not all(connection_lines(caplog.records, role, what) for role, what in wanted):
        assert time.monotonic() < deadline, f"no log line for {wanted}"
        await asyncio.sleep(0.02)


async def read_sse(session: aiohttp.ClientSession, url: str) -> int:
    """Read an SSE response to its end; returns the HTTP status."""
    async with session.get(url) as resp:
        if resp.status == 200:
            async for _ in resp.content:
                pass
        return resp.status


async def test_each_connection_logs_one_open_and_one_close_line_with_its_counts(
    relayd: Relayd, caplog: pytest.LogCaptureFixture
) -> None:
    """Producer, websocket consumer and SSE consumer: one ``opened`` and one ``closed`` line each, with fields."""
    caplog.set_level(logging.INFO, logger="relayd")
    stream = "logged"
    consumer = await relayd.consumer(stream)
    await consumer.expect("subscribed")
    assert relayd.session is not None
    sse = asyncio.create_task(
        read_sse(relayd.session, f"{relayd.url}/v1/streams/{stream}/events?token={relayd.token()}")
    )
    producer = await relayd.producer()
    await producer.open(stream)
    for seq in (1, 2, 3):
        assert (await producer.append(stream, seq, {"i": seq}))["type"] == "ack"
    await producer.send_raw('{"op": "explode"}')
    await producer.expect("error", code="unknown_op")
    assert (await producer.end(stream))["type"] == "ended"
    chunks, _ = await collect_chunks(consumer, stream)
    assert len(chunks) == 3
    assert await sse == 200
    await producer.ws.close()
    await consumer.ws.close()
    await wait_for_lines(caplog, ("producer", "closed"), ("consumer_ws", "closed"), ("consumer_sse", "closed"))

    expected_counts = {
        "producer": {"frames_in": 6, "chunks_in": 3, "streams": 1, "refused": 1, "close_code": 1000},
        "consumer_ws": {"frames_in": 0, "chunks_out": 3, "streams": 1, "refused": 0, "close_code": 1000},
        "consumer_sse": {"chunks_out": 3, "streams": 1, "close_reason": "stream_done"},
    }
    for role, counts in expected_counts.items():
        opened = connection_lines(caplog.records, role, "opened")
        closed = connection_lines(caplog.records, role, "closed")
        assert len(opened) == 1 and len(closed) == 1, (role, [r.getMessage() for r in opened + closed])
        open_line, close_line = opened[0], closed[0]
        assert open_line.levelno == close_line.levelno == logging.INFO
        assert open_line.remote == close_line.remote == "127.0.0.1"  # type: ignore[attr-defined]
        assert open_line.conn == close_line.conn  # type: ignore[attr-defined]
        fields = vars(close_line)
        assert set(fields) >= CLOSE_FIELDS, (role, fields)
        assert isinstance(fields["duration_s"], float) and fields["duration_s"] >= 0
        for key, value in counts.items():
            assert fields[key] == value, (role, key, fields[key])
        if role != "consumer_sse":
            assert fields["close_reason"] == "client_closed"
        else:
            assert fields["stream"] == stream
    refused = [r for r in caplog.records if "refused frame" in r.getMessage()]
    assert len(refused) == 1 and refused[0].code == "unknown_op"  # type: ignore[attr-defined]

    # the same records in each format: JSON and logfmt parse back to the same fields
    close_line = connection_lines(caplog.records, "producer", "closed")[0]
    as_json = json.loads(JsonFormatter().format(close_line))
    as_logfmt = parse_logfmt(LogfmtFormatter().format(close_line))
    for parsed in (as_json, as_logfmt):
        assert parsed["level"] == "info" and parsed["logger"] == "relayd.ingest"
        assert parsed["msg"].startswith("producer closed ")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", parsed["ts"])
    assert {k: as_json[k] for k in ("role", "chunks_in", "frames_in", "close_code", "close_reason")} == {
        "role": "producer",
        "chunks_in": 3,
        "frames_in": 6,
        "close_code": 1000,
        "close_reason": "client_closed",
    }
    assert {k: as_logfmt[k] for k in ("role", "chunks_in", "close_code", "close_reason", "conn")} == {
        "role": "producer",
        "chunks_in": "3",
        "close_code": "1000",
        "close_reason": "client_closed",
        "conn": as_json["conn"],
    }
    text = TextFormatter().format(close_line)
    assert "INFO relayd.ingest: producer closed " in text and "chunks_in=3" in text


async def test_secrets_never_reach_the_log_even_when_refused(relayd: Relayd, caplog: pytest.LogCaptureFixture) -> None:
    """API keys and tokens, valid or refused, appear in no log line of any format, at debug level."""
    caplog.set_level(logging.DEBUG)  # every logger, aiohttp's included
    caplog.set_level(logging.DEBUG, logger="relayd")
    assert relayd.session is not None
    wrong_key = "rk_wrong_key_5ecret_0123456789"
    good_token = relayd.token(["sec"])
    forged = relayd.tokens.mint(["sec"], ["read"], ttl_s=60)[0][:-6] + "AAAAAA"  # a bad signature
    secrets = [API_KEY, wrong_key, good_token, forged, JWT_SECRET]

    with pytest.raises(aiohttp.WSServerHandshakeError):
        await relayd.producer(api_key=wrong_key)
    refused = await relayd.consumer("sec", token=forged)
    assert await refused.closed() == 4001
    assert await read_sse(relayd.session, f"{relayd.url}/v1/streams/sec/events?token={forged}") == 401
    async with relayd.session.post(
        f"{relayd.url}/v1/tokens", headers={"Authorization": f"Bearer {wrong_key}"}, json={"streams": ["sec"]}
    ) as resp:
        assert resp.status == 401

    consumer = await relayd.consumer("sec", token=good_token)
    await consumer.expect("subscribed")
    await consumer.send({"op": "auth", "token": forged})
    await consumer.expect("error", code="unauthorized")
    producer = await relayd.producer()
    await producer.open("sec")
    await producer.append("sec", 1, {"i": 1})
    await producer.end("sec")
    await collect_chunks(consumer, "sec")
    await consumer.ws.close()
    await producer.ws.close()
    await wait_for_lines(caplog, ("producer", "closed"), ("consumer_ws", "closed"))

    assert any("refused" in r.getMessage() and getattr(r, "code", "") == "unauthorized" for r in caplog.records)
    assert connection_lines(caplog.records, "consumer_ws", "subscribe"), "debug lines are on at debug level"
    for record in caplog.records:
        for formatter in (JsonFormatter(), LogfmtFormatter(), TextFormatter()):
            line = formatter.format(record)
            for secret in secrets:
                assert secret not in line, f"a secret in the log: {line}"
            assert "token=" not in line.replace("token=[redacted]", ""), line
        for secret in secrets:
            assert secret not in record.getMessage()


def test_redact_blanks_credentials_that_reach_a_message() -> None:
    """A query string or header quoted in an exception message loses its credential."""
    assert redact("GET /v1/ws?cursor=1-2&token=eyJ.abc.def HTTP/1.1") == (
        "GET /v1/ws?cursor=1-2&token=[redacted] HTTP/1.1"
    )
    assert redact("Authorization: Bearer rk_live_123456789") == "Authorization: Bearer [redacted]"
    assert redact("protocols relayd.v1, bearer.eyJ.abc.def") == "protocols relayd.v1, bearer.[redacted]"
    assert redact("nothing to hide") == "nothing to hide"


def test_redact_blanks_what_aiohttp_quotes_from_a_malformed_request() -> None:
    """A percent-encoded ``token`` (aiohttp decodes it: it is accepted), an escaped tab after Bearer, a JWT
    or an API key anywhere: all blanked (issue 9, item 23)."""
    jwt_text = "eyJhbGciOiJIUzI1NiJ9.eyJzdHJlYW1zIjpbIioiXX0.c2ln"
    assert redact(f"GET /v1/ws?%74oken={jwt_text} HTTP/1.1") == "GET /v1/ws?%74oken=[redacted] HTTP/1.1"
    assert redact(f"?%74%6F%6B%65%6E={jwt_text}") == "?%74%6F%6B%65%6E=[redacted]"
    assert redact("b'Authorization: Bearer\\trk_live_0123456789abcdef\\x01'") == (
        "b'Authorization: Bearer\\t[redacted]\\x01'"
    )
    assert redact("Bearer\tsecret-key") == "Bearer\t[redacted]"
    assert redact(f"cursor={jwt_text}") == "cursor=[redacted]"
    assert redact("X-Key: rk_live_0123456789abcdefAAAA") == "X-Key: rk_[redacted]"
    assert redact("tokens are counted; keys are hashed") == "tokens are counted; keys are hashed"


def test_the_redaction_filter_scrubs_aiohttp_loggers_messages_and_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    """aiohttp's access and server loggers (which relayd's formatters may not handle) are scrubbed at the source."""
    install_redaction()
    caplog.set_level(logging.INFO)
    logging.getLogger("aiohttp.access").info('1.2.3.4 "GET /v1/streams/s/events?token=%s HTTP/1.1" 200', "eyJa.b.c")
    try:
        raise ValueError("Authorization: Bearer rk_live_0123456789abcdef")
    except ValueError:
        logging.getLogger("aiohttp.server").exception("Error handling request")
    assert "eyJa.b.c" not in caplog.text and "rk_live_0123456789abcdef" not in caplog.text, caplog.text
    assert "token=[redacted]" in caplog.text and "Bearer [redacted]" in caplog.text


def test_rate_limit_lets_n_lines_a_second_through_and_counts_the_rest() -> None:
    limit = RateLimit(per_s=3)
    assert [limit.allow(10.0 + i / 100) for i in range(5)] == [0, 0, 0, None, None]
    assert limit.allow(11.5) == 2  # the first line of the next second reports the two held back
    assert limit.allow(11.6) == 0


async def raw_request(url: str, data: bytes) -> bytes:
    """Send ``data`` on a fresh TCP connection; what relayd answered before closing."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_malformed_requests_get_one_warning_each_without_traceback_or_secret(
    relayd: Relayd, caplog: pytest.LogCaptureFixture
) -> None:
    """Each request aiohttp's parser refuses is answered 400, counted, and logged as one WARNING line without
    traceback and without the credentials it carried, whatever the format (issue 9, items 23 and 24)."""
    caplog.set_level(logging.DEBUG)
    token = relayd.token(["s"])
    requests = [
        b"GET /v1/streams/s/events?%74oken=" + token.encode() + b" HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"GET /v1/ingest HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer\t" + API_KEY.encode() + b"\x01\r\n\r\n",
        b"GET /v1/ingest HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode() + b"A" * 9000 + b"\r\n\r\n",
        b"GET /v1/ws?token=" + token.encode() + b"A" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    for data in requests:
        answer = await raw_request(relayd.url, data)
        assert answer.split(b" ", 2)[1] == b"400", answer[:80]
    lines = [r for r in caplog.records if r.name == "relayd.http"]
    assert len(lines) == len(requests), [r.getMessage() for r in caplog.records]
    for record in lines:
        assert record.levelno == logging.WARNING and record.exc_info is None
        assert record.getMessage().startswith("bad http request ") and record.status == 400  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.name.startswith("aiohttp") and r.levelno >= logging.WARNING]
    for record in caplog.records:
        for formatter in (JsonFormatter(), LogfmtFormatter(), TextFormatter(), logging.Formatter()):
            line = formatter.format(record)
            assert token not in line and API_KEY not in line, line
    assert relayd.session is not None
    async with relayd.session.get(f"{relayd.url}/metrics") as resp:
        families = text_string_to_metric_families(await resp.text())
    samples = {sample.name: sample.value for family in families for sample in family.samples}
    assert samples["relayd_bad_http_requests_total"] == len(requests)


async def test_a_flood_of_malformed_requests_is_rate_limited(relayd: Relayd, caplog: pytest.LogCaptureFixture) -> None:
    """50 bad requests: every one counted, at most BAD_REQUEST_LINES_PER_S lines a second logged."""
    caplog.set_level(logging.WARNING)
    started = time.monotonic()
    for _ in range(50):
        await raw_request(relayd.url, b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
    elapsed = time.monotonic() - started
    lines = [r for r in caplog.records if r.name == "relayd.http"]
    assert 1 <= len(lines) <= BAD_REQUEST_LINES_PER_S * (int(elapsed) + 2), (len(lines), elapsed)
    if elapsed < 1:
        assert len(lines) == BAD_REQUEST_LINES_PER_S
    assert "traceback" not in caplog.text.lower()


def test_a_handler_bug_keeps_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """Only parser refusals are shortened: an exception raised by a handler is still an ERROR with a traceback."""
    caplog.set_level(logging.DEBUG)
    errors = RequestErrorLog(Metrics())
    try:
        raise KeyError("boom")
    except KeyError as exc:
        errors.exception("Error handling request from %s", "1.2.3.4", exc_info=exc)
    (record,) = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert record.levelno == logging.ERROR and record.exc_info is not None


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root, ours = logging.getLogger(), logging.getLogger("relayd")
    saved: list[Any] = [root.handlers[:], root.level, ours.handlers[:], ours.level, ours.propagate]
    try:
        yield
    finally:
        root.handlers[:], ours.handlers[:] = saved[0], saved[2]
        root.setLevel(saved[1])
        ours.setLevel(saved[3])
        ours.propagate = saved[4]


@pytest.mark.parametrize("fmt", ["json", "logfmt", "text"])
def test_setup_logging_writes_the_configured_format_to_stderr(
    fmt: str, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    """``log.format`` picks the formatter; ``log.level`` filters relayd's lines."""
    setup_logging(LogConfig(level="info", format=fmt))
    log = logging.getLogger("relayd.test")
    log.debug("hidden")
    log.info("producer closed chunks_in=3", extra={"role": "producer", "chunks_in": 3})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    if fmt == "json":
        assert json.loads(lines[0])["chunks_in"] == 3
    elif fmt == "logfmt":
        assert parse_logfmt(lines[0])["chunks_in"] == "3"
    else:
        assert lines[0].endswith("INFO relayd.test: producer closed chunks_in=3")


def test_log_format_is_validated() -> None:
    """Only the formats relayd has are accepted, naming the key."""
    assert set(FORMATTERS) == {"text", "json", "logfmt"}
    assert build_config({"log": {"format": "logfmt"}}, env={}).log.format == "logfmt"
    with pytest.raises(ConfigError, match=r"log\.format"):
        build_config({"log": {"format": "xml"}}, env={})


async def test_close_lines_log_the_code_the_peer_received_on_a_drain(
    config_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A drain closes websockets with 1012, and their close lines say 1012, not the peer's echo."""
    caplog.set_level(logging.INFO, logger="relayd")
    server = Relayd(config_factory())
    await server.__aenter__()
    try:
        consumer = await server.consumer("drained")
        await consumer.expect("subscribed")
        producer = await server.producer()
        await producer.open("drained")
        codes = asyncio.gather(consumer.closed(), producer.closed())  # both read until their close
        await server.server.stop()
        assert await codes == [1012, 1012]
    finally:
        await server.__aexit__()
    for role in ("consumer_ws", "producer"):
        (line,) = connection_lines(caplog.records, role, "closed")
        assert (line.close_code, line.close_reason) == (1012, "shutting_down"), line.getMessage()  # type: ignore[attr-defined]
