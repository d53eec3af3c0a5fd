"""The Durable Streams HTTP protocol on relayd's engine (docs/protocol.md, "Durable Streams").

``codec`` is the protocol's pure part (offsets, headers, bodies, SSE events); ``engine`` runs it
on the store and the hub; relayd/web/durable.py speaks HTTP.
"""
