"""aiohttp adapters: ingest, consumer websocket, SSE, tokens, health and metrics."""
