"""A background worker: jobs from a queue, several answers at once, all on one relayd connection.

    relayd serve                                        # terminal 1
    python examples/worker.py "first prompt" "second"   # terminal 2 (no prompts: three demo ones)

For each job it prints the stream id and a ``curl`` command that follows the answer as it is
written (run it in terminal 3, even before the job starts: relayd waits for the stream). The
streams are ``text`` streams (``text_encoder`` keeps only each OpenAI chunk's delta text), so
curl shows the words themselves. A worker process has no connection to the browser at all: the
web app only hands out the stream id and a token.

Without ``--openai-base-url`` the worker starts the fake model (examples/fake_openai.py) itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import uuid
from dataclasses import dataclass

import credentials
import openai
from fake_openai import start_fake_openai

from relayd.client import Producer, StreamResult, mint_token, text_encoder

DEMO_PROMPTS = ("Why stream through a relay?", "What is a cursor?", "How does a reload resume?")


@dataclass(frozen=True)
class Job:
    stream_id: str
    prompt: str


async def run_worker(
    relayd_url: str,
    api_key: str,
    prompts: list[str],
    *,
    openai_base_url: str,
    jwt_secret: str | None = None,
    concurrency: int = 4,
    model: str = "gpt-4o-mini",
) -> dict[str, StreamResult]:
    """Answer every prompt, ``concurrency`` at a time; returns each stream's result by id."""
    jobs: asyncio.Queue[Job] = asyncio.Queue()
    for prompt in prompts:
        job = Job(f"job-{uuid.uuid4().hex[:12]}", prompt)
        jobs.put_nowait(job)
        print(f"{job.stream_id}: {prompt}")
        if jwt_secret is not None:
            token = mint_token(jwt_secret, streams=[job.stream_id], ttl=600)
            print(f'  curl -N "{relayd_url}/v1/streams/{job.stream_id}/events?token={token}"')
    results: dict[str, StreamResult] = {}

    async def work(producer: Producer, client: openai.AsyncOpenAI) -> None:
        while not jobs.empty():
            job = jobs.get_nowait()
            try:
                completion = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": job.prompt}], stream=True
                )
                # Many streams share the producer's one websocket; chunks sent in the same tick go
                # out together. A consumer's cancel stops this loop and closes the model stream.
                results[job.stream_id] = result = await producer.stream(job.stream_id, completion)
            except openai.OpenAIError as exc:  # this job failed; the worker goes on with the next
                print(f"{job.stream_id}: failed: {exc}")
                continue
            print(f"{job.stream_id}: {result.reason} ({result.chunks} chunks)")

    async with (
        Producer(relayd_url, api_key, encoder=text_encoder, content_type="text") as producer,
        openai.AsyncOpenAI(base_url=openai_base_url, api_key="not-needed-for-the-fake-model") as client,
        asyncio.TaskGroup() as group,
    ):
        for _ in range(min(concurrency, len(prompts))):
            group.create_task(work(producer, client))
    return results


async def _main(args: argparse.Namespace) -> None:
    fake = None
    base_url = args.openai_base_url
    if base_url is None:
        fake = await start_fake_openai(tokens=60, tokens_per_s=15, ttft_s=0.5)
        base_url = fake.base_url
    try:
        await run_worker(
            args.relayd_url,
            credentials.api_key(args.api_key),
            list(args.prompts) or list(DEMO_PROMPTS),
            openai_base_url=base_url,
            jwt_secret=credentials.jwt_secret(args.jwt_secret),
            concurrency=args.concurrency,
        )
    finally:
        if fake is not None:
            await fake.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A background worker producing relayd streams.")
    parser.add_argument("prompts", nargs="*", help="one job per prompt (default: three demo prompts)")
    parser.add_argument("--relayd-url", default=os.environ.get("RELAYD_URL", "http://127.0.0.1:8080"))
    parser.add_argument("--api-key", help="producer API key (default: $RELAYD_API_KEY or relayd-data/dev-credentials)")
    parser.add_argument("--jwt-secret", help="to sign the curl tokens (default: $RELAYD_JWT_SECRET or dev-credentials)")
    parser.add_argument("--openai-base-url", help="an OpenAI-compatible API (default: the fake model, in-process)")
    parser.add_argument("--concurrency", type=int, default=4)
    asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
