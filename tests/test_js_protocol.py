"""The TypeScript SDK's wire constants (clients/js/src/protocol.ts) match relayd's own.

They are read from the compiled module with node, and compared with relayd/protocol.py,
relayd/errors.py and relayd/auth.py, so the two cannot drift apart: an op, error code, close
code, end reason or id rule added on one side fails here until the other side has it too.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from relayd import protocol
from relayd.auth import RIGHTS
from relayd.errors import ERROR_CODES, CloseCode
from relayd.protocol import FrameError, ProducerDecoder, decode_consumer
from relayd.web.consume import SUBPROTOCOL
from tests.jsnode import JS, build, require_node

_DUMP = """
const p = await import(process.argv[1]);
const out = {};
for (const [name, value] of Object.entries(p)) {
  if (typeof value === "function") continue;
  out[name] = value instanceof RegExp ? value.source : value;
}
console.log(JSON.stringify(out));
"""


@pytest.fixture(scope="module")
def ts() -> dict[str, Any]:
    node = require_node()
    build()
    done = subprocess.run(
        [node, "--input-type=module", "-e", _DUMP, (JS / "dist" / "protocol.js").as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    constants: dict[str, Any] = json.loads(done.stdout)
    return constants


# The decoders' source (not inspect.getsource: in the compiled build they are C, without source).
_PROTOCOL_PY = (Path(__file__).resolve().parent.parent / "relayd" / "protocol.py").read_text()


def _ops_in(qualname: str) -> set[str]:
    """The op names relayd/protocol.py's ``qualname`` compares ``op`` with (``op == "x"``, ``op in ("x", "y")``)."""
    scope: Any = ast.parse(_PROTOCOL_PY)
    for name in qualname.split("."):
        scope = next(node for node in scope.body if getattr(node, "name", None) == name)
    source = ast.get_source_segment(_PROTOCOL_PY, scope) or ""
    names = set(re.findall(r'op == "(\w+)"', source))
    for group in re.findall(r"op in \(([^)]*)\)", source):
        names.update(re.findall(r'"(\w+)"', group))
    return names


def test_op_names_are_the_ones_relayd_decodes(ts: dict[str, Any]) -> None:
    # (decode takes the common one-chunk append itself and hands everything else to _decode)
    assert set(ts["PRODUCER_OPS"]) == _ops_in("ProducerDecoder.decode") | _ops_in("ProducerDecoder._decode")
    assert set(ts["CONSUMER_OPS"]) == _ops_in("decode_consumer")
    decoder = ProducerDecoder(1 << 20)
    for op in ts["PRODUCER_OPS"]:  # each is known to relayd (whatever else the frame lacks)
        result = decoder.decode(json.dumps({"op": op, "stream": "s"}))
        assert not (isinstance(result, FrameError) and result.error.code == "unknown_op"), op
    for op in ts["CONSUMER_OPS"]:
        result = decode_consumer(json.dumps({"op": op, "stream": "s", "token": "t"}))
        assert not (isinstance(result, FrameError) and result.error.code == "unknown_op"), op


def test_error_close_codes_and_enums_match(ts: dict[str, Any]) -> None:
    assert ts["ERROR_CODES"] == list(ERROR_CODES)
    assert ts["CLOSE_CODES"] == {code.name: code.value for code in CloseCode}
    assert set(ts["END_REASONS"]) == protocol.END_REASONS
    assert set(ts["PRODUCER_END_REASONS"]) == protocol.PRODUCER_END_REASONS
    assert set(ts["CONTENT_TYPES"]) == protocol.CONTENT_TYPES
    assert set(ts["RIGHTS"]) == RIGHTS
    assert ts["SUBPROTOCOL"] == SUBPROTOCOL
    assert ts["MAX_END_MESSAGE"] == protocol.MAX_END_MESSAGE
    assert ts["MAX_EXACT_INT"] == protocol.MAX_EXACT_INT


def test_id_rules_match(ts: dict[str, Any]) -> None:
    assert ts["STREAM_ID_RE"] == f"^{protocol.STREAM_ID_RE.pattern}$"
    assert ts["PRODUCER_ID_RE"] == f"^{protocol.PRODUCER_ID_RE.pattern}$"
