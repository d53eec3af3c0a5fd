"""The TypeScript SDK (clients/js) under Node's test runner, against a real relayd.

The node tests (clients/js/test/sdk.test.mjs) cover: a producer's stream reaching a consumer in
order and once, text streams and error ends, consumer resume after a dropped socket, several
streams over one websocket, abort that cancels the generation (and one that cannot), producer
resend after a dropped socket without duplicates, the producer's ack window (send() waits
while acks are held back by a proxy), and minted tokens. Their TAP output is shown
when they fail.
"""

from __future__ import annotations

from tests.helpers import Relayd
from tests.jsnode import node_test


async def test_the_typescript_sdk_node_tests_pass_against_relayd(relayd: Relayd) -> None:
    code, tap = await node_test(relayd.url, "sdk.test.mjs")
    assert code == 0, f"node --test failed (exit {code}):\n{tap}"


async def test_the_ai_sdk_transport_node_tests_pass_against_relayd(relayd: Relayd) -> None:
    """The ChatTransport and relayUIMessageStream with the real `ai` package (clients/js/test/ai.test.mjs)."""
    code, tap = await node_test(relayd.url, "ai.test.mjs")
    assert code == 0, f"node --test failed (exit {code}):\n{tap}"
