// The AI SDK transport with the real `ai` package: a chat route relays streamText(...) of the
// AI SDK's own mock model into relayd (relayUIMessageStream), and the framework-free Chat
// (AbstractChat) reads it through RelaydChatTransport: a whole answer, a resume after a
// "reload" (a new Chat and transport), and stop() cancelling the model call.
import assert from "node:assert/strict";
import http from "node:http";
import { test } from "node:test";

import { AbstractChat, streamText } from "ai";
import { MockLanguageModelV3 } from "ai/test";

import { RelaydChatTransport, relayUIMessageStream } from "../dist/ai.js";
import { Producer, mintToken } from "../dist/producer.js";
import { API_KEY, JWT_SECRET, RELAYD_URL, streamId, until } from "./helpers.mjs";

const usage = { inputTokens: { total: 1, noCache: 1, cacheRead: 0, cacheWrite: 0 }, outputTokens: { total: 1, text: 1, reasoning: 0 } };

/** A model streaming `words`; each word waits for `gate()` (so a test can hold it mid-answer). */
function model(words, gate, seen) {
  return new MockLanguageModelV3({
    doStream: async ({ abortSignal }) => {
      seen.signal = abortSignal;
      return {
        stream: new ReadableStream({
          async start(controller) {
            controller.enqueue({ type: "stream-start", warnings: [] });
            controller.enqueue({ type: "text-start", id: "t" });
            for (const word of words) {
              await gate();
              if (abortSignal?.aborted) return controller.error(abortSignal.reason);
              controller.enqueue({ type: "text-delta", id: "t", delta: word });
            }
            controller.enqueue({ type: "text-end", id: "t" });
            controller.enqueue({ type: "finish", finishReason: { unified: "stop", raw: "stop" }, usage });
            controller.close();
          },
        }),
      };
    },
  });
}

/** The app's chat route: starts the generation in the background, answers {streamId, token}. */
async function chatRoute(words, gate = async () => {}) {
  const producer = new Producer({ url: RELAYD_URL, apiKey: API_KEY });
  const seen = { results: [], signal: null };
  const server = http.createServer(async (req, res) => {
    let body = "";
    for await (const part of req) body += part;
    const { id, messages } = JSON.parse(body);
    assert.equal(messages.at(-1).role, "user");
    const sid = `${streamId("chat")}-${id}`;
    seen.results.push(relayUIMessageStream(producer, sid, (signal) =>
      streamText({ model: model(words, gate, seen), prompt: "hi", abortSignal: signal }).toUIMessageStream()));
    res.setHeader("Content-Type", "application/json");
    res.end(JSON.stringify({ streamId: sid, token: mintToken(JWT_SECRET, [sid], { rights: ["read", "cancel"] }) }));
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const api = `http://127.0.0.1:${server.address().port}/api/chat`;
  return {
    api, seen,
    async close() { await producer.close(); await new Promise((resolve) => server.close(resolve)); },
  };
}

class State {
  status = "ready"; error = undefined; messages = [];
  pushMessage = (m) => { this.messages = [...this.messages, m]; };
  popMessage = () => { this.messages = this.messages.slice(0, -1); };
  replaceMessage = (i, m) => { this.messages = this.messages.map((old, j) => (j === i ? m : old)); };
  snapshot = (thing) => structuredClone(thing);
}

class Chat extends AbstractChat {
  constructor(init) { super({ ...init, state: new State() }); }
}

function text(chat) {
  const last = chat.messages.at(-1);
  return last?.role === "assistant" ? last.parts.filter((p) => p.type === "text").map((p) => p.text).join("") : "";
}

function memoryStore() {
  const map = new Map();
  return { getItem: (k) => map.get(k) ?? null, setItem: (k, v) => map.set(k, v) };
}

test("useChat's Chat gets the whole answer through relayd", async () => {
  const route = await chatRoute(["Hello", ", ", "world"]);
  const transport = new RelaydChatTransport({ api: route.api, relaydUrl: RELAYD_URL, persist: memoryStore() });
  const chat = new Chat({ id: "c1", transport });
  await chat.sendMessage({ text: "hi" });
  assert.equal(chat.status, "ready");
  assert.equal(text(chat), "Hello, world");
  const [result] = await Promise.all(route.seen.results);
  assert.equal(result.reason, "completed");
  // The stream is over: a reload has nothing to resume.
  assert.equal(await transport.reconnectToStream({ chatId: "c1" }), null);
  await route.close();
});

test("after a reload mid-answer, resumeStream replays the answer and follows it to the end", async () => {
  let release;
  let held = new Promise((resolve) => { release = resolve; });
  let words = 0;
  const gate = async () => { if (++words === 3) await held; };
  const route = await chatRoute(["one ", "two ", "three ", "four"], gate);
  const store = memoryStore();
  const first = new Chat({ id: "c2", transport: new RelaydChatTransport({ api: route.api, relaydUrl: RELAYD_URL, persist: store }) });
  const sending = first.sendMessage({ text: "count" });
  await until(() => text(first) === "one two ", "the first words");
  // The page reloads: a new Chat and transport, the same storage.
  const reloaded = new Chat({ id: "c2", transport: new RelaydChatTransport({ api: route.api, relaydUrl: RELAYD_URL, persist: store }) });
  const resuming = reloaded.resumeStream();
  await until(() => text(reloaded) === "one two ", "the replayed words");
  release();
  await resuming;
  assert.equal(text(reloaded), "one two three four");
  assert.equal(reloaded.messages.length, 1);
  await sending;
  await route.close();
});

test("stop() cancels the generation: the model call's signal aborts, the stream ends cancelled", async () => {
  let release;
  const held = new Promise((resolve) => { release = resolve; });
  let words = 0;
  const gate = async () => { if (++words === 2) await held; };
  const route = await chatRoute(["a ", "b ", "c"], gate);
  const chat = new Chat({ id: "c3", transport: new RelaydChatTransport({ api: route.api, relaydUrl: RELAYD_URL, persist: memoryStore() }) });
  const sending = chat.sendMessage({ text: "go" });
  await until(() => text(chat) === "a ", "the first word");
  await chat.stop();
  await sending;
  const [result] = await Promise.all(route.seen.results);
  release();
  assert.equal(result.reason, "cancelled");
  assert.ok(route.seen.signal.aborted, "the model call was aborted");
  assert.equal(text(chat), "a ");
  await route.close();
});
