"""A Celery-style task streaming a model answer into relayd from plain synchronous code.

    relayd serve                                          # terminal 1
    python examples/celery_task.py "Why is the sky blue?" # terminal 2: calls the task directly

Task queues (Celery, RQ, Dramatiq) run synchronous functions in worker processes that have no
connection to the user's browser. The web request only enqueues the task and hands the page a
stream id and a token; the task writes the answer into relayd with :class:`SyncProducer`
(one event loop in a daemon thread, so nothing here is async) and the synchronous OpenAI client.

With Celery the function below becomes a task by its decorator; nothing else changes::

    from celery import Celery
    app = Celery("answers", broker="redis://localhost:6379/0")

    @app.task                                   # <- here
    def generate_answer(stream_id, prompt): ...

    # in the web route:
    generate_answer.delay(stream_id, prompt)    # then return stream_id + mint_token(...) to the page

Configuration comes from the environment, as a worker's does: ``RELAYD_URL``,
``RELAYD_API_KEY`` (or relayd-data/dev-credentials), ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``
(read by the OpenAI client itself). Without ``OPENAI_BASE_URL`` the command below starts the
fake model (examples/fake_openai.py) in a thread.
"""

from __future__ import annotations

import argparse
import os
import uuid
from typing import Any

import credentials
import openai
from fake_openai import fake_openai_in_thread

from relayd.client import SyncProducer, mint_token, text_encoder


# @app.task  <- with Celery
def generate_answer(
    stream_id: str,
    prompt: str,
    *,
    relayd_url: str | None = None,
    api_key: str | None = None,
    openai_base_url: str | None = None,
    model: str = "gpt-4o-mini",
) -> dict[str, Any]:
    """Stream the model's answer to ``prompt`` into relayd as ``stream_id``; returns how it ended.

    The return value is a small JSON-able dict, as a task result should be. A consumer's cancel
    stops the loop inside ``producer.stream`` and closes the model stream (the call is aborted).
    """
    client = openai.OpenAI(
        base_url=openai_base_url, api_key=os.environ.get("OPENAI_API_KEY", "not-needed-for-the-fake-model")
    )
    # One connection per task keeps the example short. A busy worker would keep one
    # SyncProducer per process (open it in Celery's worker_process_init signal) and share it:
    # its methods are thread-safe and one websocket carries any number of streams.
    url = relayd_url or os.environ.get("RELAYD_URL", "http://127.0.0.1:8080")
    # A text stream: text_encoder keeps each chunk's delta text, so curl shows plain words.
    producer = SyncProducer(url, api_key or credentials.api_key(), encoder=text_encoder, content_type="text")
    with client, producer:
        completion = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], stream=True
        )
        result = producer.stream(stream_id, completion)
    return {"stream": result.stream, "reason": result.reason, "chunks": result.chunks, "cursor": result.cursor}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Call the Celery-style task directly, once.")
    parser.add_argument("prompt", nargs="?", default="Why do task queues and browsers need a relay?")
    args = parser.parse_args(argv)
    relayd_url = os.environ.get("RELAYD_URL", "http://127.0.0.1:8080")
    stream_id = f"task-{uuid.uuid4().hex[:12]}"
    # What the web route would return to the page, which then follows the stream itself:
    token = mint_token(credentials.jwt_secret(), streams=[stream_id], ttl=600)
    print(f"{stream_id}: follow it with")
    print(f'  curl -N "{relayd_url}/v1/streams/{stream_id}/events?token={token}"', flush=True)
    if os.environ.get("OPENAI_BASE_URL"):
        print(generate_answer(stream_id, args.prompt, relayd_url=relayd_url))
        return
    with fake_openai_in_thread(tokens=60, tokens_per_s=20, ttft_s=0.5) as fake:
        print(generate_answer(stream_id, args.prompt, relayd_url=relayd_url, openai_base_url=fake.base_url))


if __name__ == "__main__":
    main()
