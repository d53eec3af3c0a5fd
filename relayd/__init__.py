"""relayd: a self-hosted relay for streaming LLM output.

Producers push the chunks of a stream over a websocket; relayd makes them durable in Redis
Streams and fans them out in memory to websocket and SSE consumers, who can resume from any
cursor with no gap and no duplicate.
"""

__version__ = "0.1.0"
