"""The optional compiled build: ``RELAYD_MYPYC=1 pip install .`` compiles relayd's hot modules with
mypyc (docs/operations.md, "The compiled build"). Without it, a pure Python package. Everything
else about the package is in pyproject.toml."""

from __future__ import annotations

import os

from setuptools import setup

# The modules every chunk goes through; the rest of relayd (aiohttp handlers, web/inline.py's
# subclass of aiohttp's private reader queue among them) stays interpreted.
HOT_MODULES = [
    "relayd/protocol.py",
    "relayd/relay.py",
    "relayd/hub.py",
    "relayd/outbox.py",
    "relayd/subscription.py",
    "relayd/producer.py",
    "relayd/budget.py",
    "relayd/model.py",
    "relayd/hot_metrics.py",
    "relayd/store/appends.py",
    "relayd/store/pages.py",
    "relayd/store/pipeline.py",
    "relayd/store/redis_streams.py",
    "relayd/store/replies.py",
    "relayd/store/resp.py",
    "relayd/store/wire.py",
    "relayd/web/ingest.py",
    "relayd/web/openai_sse.py",
    "relayd/web/transport.py",
]

if os.environ.get("RELAYD_MYPYC") == "1":
    from mypyc.build import mypycify

    setup(ext_modules=mypycify(HOT_MODULES, opt_level="3", group_name="relayd"))
else:
    setup()
