// The TypeScript SDK against a real relayd (started by tests/test_js_sdk.py): producer and
// consumer together, resume, multiplexing, cancel by abort, producer resend and ack window,
// minted tokens.
import assert from "node:assert/strict";
import { test } from "node:test";

import { RelaydError, connect, openConnection } from "../dist/index.js";
import { Producer, mintToken } from "../dist/producer.js";
import { API_KEY, JWT_SECRET, RELAYD_URL, tcpProxy, streamId, until } from "./helpers.mjs";

const token = (streams, rights = ["read"]) => mintToken(JWT_SECRET, streams, { rights, ttlS: 60 });
const backoff = { initialMs: 20, maxMs: 200 };

async function* counted(n, pause = null) {
  for (let i = 1; i <= n; i++) {
    if (pause && i % 10 === 0) await pause(i);
    yield { n: i };
  }
}

async function collect(sub) {
  const got = [];
  for await (const chunk of sub) got.push(chunk);
  return got;
}

test("a producer's stream reaches a consumer in order, each chunk once, then the end", async () => {
  const id = streamId("basic");
  const producer = new Producer({ url: RELAYD_URL, apiKey: API_KEY });
  const sub = connect({ url: RELAYD_URL, streamId: id, token: token([id]), waitMs: 5000 });
  const [result, got] = await Promise.all([producer.stream(id, counted(200)), collect(sub)]);
  await producer.close();
  assert.equal(result.reason, "completed");
  assert.equal(result.chunks, 200);
  assert.deepEqual(got, Array.from({ length: 200 }, (_, i) => ({ n: i + 1 })));
  const end = await sub.ended;
  assert.equal(end.reason, "completed");
  assert.equal(end.cursor, result.cursor);
  assert.ok(producer.messagesSent < 200, `batched: ${producer.messagesSent} messages for 200 chunks`);
});

test("text streams, typed chunks through a decoder, and an error end with its message", async () => {
  const id = streamId("text");
  const producer = new Producer({ url: RELAYD_URL, apiKey: API_KEY });
  async function* failing() {
    yield "Hel";
    yield { choices: [{ delta: { content: "lo" } }] }; // the text encoder reads OpenAI chunks
    throw new Error("model timed out");
  }
  const result = await producer.stream(id, failing(), { contentType: "text", raiseOnError: false });
  await producer.close();
  assert.equal(result.reason, "error");
  assert.equal(result.error.message, "model timed out");
  /** @type {import("../dist/index.js").Subscription<{text: string}>} */
  const sub = connect({ url: RELAYD_URL, streamId: id, token: token([id]), decoder: (text) => ({ text }) });
  assert.deepEqual(await collect(sub), [{ text: "Hel" }, { text: "lo" }]);
  const end = await sub.ended;
  assert.deepEqual([end.reason, end.message], ["error", "model timed out"]);
});

test("a consumer whose socket drops resumes from its cursor: nothing lost, nothing twice", async () => {
  const id = streamId("resume");
  const proxy = await tcpProxy();
  const producer = new Producer({ url: RELAYD_URL, apiKey: API_KEY });
  const writer = producer.writer(id);
  const sub = connect({ url: proxy.url, streamId: id, token: token([id]), backoff, waitMs: 5000 });
  const got = [];
  const reading = (async () => { for await (const c of sub) got.push(c.n); })();
  for (let i = 1; i <= 60; i++) {
    await writer.send({ n: i });
    if (i % 20 === 0) {
      await producer.flush();
      await until(() => got.length === i, `chunk ${i} at the consumer`);
      proxy.drop();
    }
  }
  await writer.end("completed");
  await reading;
  await producer.close();
  await proxy.close();
  assert.deepEqual(got, Array.from({ length: 60 }, (_, i) => i + 1));
  assert.ok(proxy.connections >= 3, `reconnected: ${proxy.connections} connections`);
});

test("several streams share one websocket", async () => {
  const prefix = streamId("mux");
  const ids = [1, 2, 3].map((i) => `${prefix}/s${i}`);
  let sockets = 0;
  const Base = globalThis.WebSocket ?? (await import("ws")).default;
  const Counting = class extends Base {
    constructor(...args) { super(...args); sockets += 1; }
  };
  const conn = openConnection({ url: RELAYD_URL, token: token([`${prefix}/*`]), WebSocket: Counting });
  const subs = ids.map((id) => conn.subscribe(id, { waitMs: 5000 }));
  const producer = new Producer({ url: RELAYD_URL, apiKey: API_KEY });
  const [, ...received] = await Promise.all([
    Promise.all(ids.map((id, i) => producer.stream(id, counted(10 * (i + 1))))),
    ...subs.map(collect),
  ]);
  await producer.close();
  assert.deepEqual(received.map((r) => r.length), [10, 20, 30]);
  assert.deepEqual(received[2].map((c) => c.n), Array.from({ length: 30 }, (_, i) => i + 1));
  assert.equal(sockets, 1);
  assert.equal(conn.status, "open");
  conn.close();
  assert.equal(conn.status, "closed");
});

test("aborting with cancelOnAbort cancels the generation: the upstream's signal aborts", async () => {
  const id = streamId("abort");
  const producer = new Producer({ url: RELAYD_URL, apiKey: API_KEY });
  let upstreamSignal;
  async function* model(signal) {
    upstreamSignal = signal;
    for (let i = 1; !signal.aborted; i++) {
      yield { n: i };
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
  }
  const streaming = producer.stream(id, (signal) => model(signal));
  const controller = new AbortController();
  const sub = connect({
    url: RELAYD_URL, streamId: id, token: token([id], ["read", "cancel"]), signal: controller.signal,
    cancelOnAbort: true, waitMs: 5000,
  });
  const got = [];
  for await (const chunk of sub) {
    got.push(chunk);
    if (got.length === 3) controller.abort();
  }
  const result = await streaming;
  await producer.close();
  assert.equal(result.reason, "cancelled");
  assert.ok(upstreamSignal.aborted);
  await assert.rejects(sub.ended, (err) => err instanceof RelaydError && err.code === "closed");
});

test("aborting without the cancel right only closes the subscription", async () => {
  const id = streamId("abort-read");
  const producer = new Producer({ url: RELAYD_URL, apiKey: API_KEY });
  const writer = producer.writer(id);
  await writer.send("a");
  const controller = new AbortController();
  const sub = connect({ url: RELAYD_URL, streamId: id, token: token([id]), signal: controller.signal, cancelOnAbort: true });
  for await (const _ of sub) controller.abort();
  await writer.send("b");
  assert.equal(writer.cancelled, false);
  assert.equal((await writer.end("completed")).reason, "completed");
  await producer.close();
});

test("a producer whose socket drops resends what was not acknowledged, stored once", async () => {
  const id = streamId("resend");
  const proxy = await tcpProxy();
  const producer = new Producer({ url: proxy.url, apiKey: API_KEY, backoff });
  const result = await producer.stream(id, counted(300, async (i) => {
    if (i % 100 !== 0) return;
    // Once the connection carries chunks (some acknowledged, some perhaps still in flight), drop it.
    await until(() => proxy.connections === i / 100 && producer.unackedBytes < 100 * 8, "a connection with acks");
    proxy.drop();
  }));
  await producer.close();
  await proxy.close();
  assert.equal(result.reason, "completed");
  assert.ok(proxy.connections >= 3, `reconnected: ${proxy.connections} connections`);
  const got = await collect(connect({ url: RELAYD_URL, streamId: id, token: token([id]) }));
  assert.deepEqual(got.map((c) => c.n), Array.from({ length: 300 }, (_, i) => i + 1));
});

test("send() waits while maxUnackedBytes are unacknowledged, and goes on as acks free room", async () => {
  const id = streamId("window");
  const proxy = await tcpProxy();
  const window = 1000;
  const producer = new Producer({ url: proxy.url, apiKey: API_KEY, maxUnackedBytes: window });
  const sub = connect({ url: RELAYD_URL, streamId: id, token: token([id]), waitMs: 5000 });
  const got = [];
  const reading = (async () => { for await (const chunk of sub) got.push(chunk); })();
  try {
    const writer = producer.writer(id);
    const chunk = (n) => ({ n, pad: "x".repeat(90) }); // ~100 bytes of JSON: ~10 fit the window
    await writer.send(chunk(1));
    await producer.flush(); // connected, opened and acknowledged; from here relayd's acks are held back
    proxy.hold();
    const total = 40;
    let queued = 1;
    let peak = 0;
    const sending = (async () => {
      for (let n = 2; n <= total; n++) {
        await writer.send(chunk(n));
        queued = n;
        peak = Math.max(peak, producer.unackedBytes);
      }
    })();
    // relayd stored everything send() let through and acknowledged it, but no ack reached the producer
    await until(() => got.length === queued && producer.unackedBytes + 100 > window, "a full window, stored");
    await until(() => proxy.heldBytes > 0, "acks held back");
    assert.ok(queued < total, `send() waits for room: ${queued} of ${total} queued`);
    assert.ok(queued >= 5, `the window was used: ${queued} queued`);
    proxy.release();
    await sending;
    assert.equal((await writer.end("completed")).reason, "completed");
    await reading;
    assert.ok(peak <= window, `at most maxUnackedBytes unacknowledged: ${peak}`);
    assert.deepEqual(got.map((c) => c.n), Array.from({ length: total }, (_, i) => i + 1)); // once each, in order
  } finally {
    proxy.release();
    sub.close();
    await producer.close().catch(() => {});
    await proxy.close();
  }
});

test("mintToken's tokens are accepted by relayd; a wrong secret is refused", async () => {
  const id = streamId("tokens");
  const producer = new Producer({ url: RELAYD_URL, apiKey: API_KEY });
  await producer.stream(id, ["x"]);
  await producer.close();
  const ok = connect({ url: RELAYD_URL, streamId: id, token: mintToken(JWT_SECRET, [`${id.slice(0, 6)}*`], { sub: "u1" }) });
  assert.deepEqual(await collect(ok), ["x"]);
  const bad = connect({ url: RELAYD_URL, streamId: id, token: mintToken("x".repeat(32), [id]) });
  await assert.rejects(collect(bad), (err) => err.code === "unauthorized");
});

test("a wrong API key is refused at connect, not retried", async () => {
  const producer = new Producer({ url: RELAYD_URL, apiKey: "rk_wrong", backoff });
  await assert.rejects(producer.connect(), (err) => err.code === "unauthorized");
});
