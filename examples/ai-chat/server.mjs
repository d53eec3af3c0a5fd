// A chat app on the Vercel AI SDK whose answers run in the background and reach the page through
// relayd: reload the page mid-answer and it resumes; Stop cancels the model call.
//
//   relayd serve &                       # in the relayd checkout (prints its API key and JWT secret)
//   npm install && RELAYD_API_KEY=... RELAYD_JWT_SECRET=... npm start   # then open http://127.0.0.1:3000
//
// Environment: RELAYD_URL (default http://127.0.0.1:8080), RELAYD_API_KEY, RELAYD_JWT_SECRET,
// PORT (default 3000; 0 picks a free one), WORD_MS (the demo model's pace, default 120),
// HOLD_AFTER (tests: the demo model waits after that many words until POST /api/release).
// The model is a demo that streams a canned answer word by word (no API key needed); put a real
// one in `model()` (e.g. `openai("gpt-4o-mini")` from @ai-sdk/openai).
import { readFile } from "node:fs/promises";
import http from "node:http";
import { randomUUID } from "node:crypto";

import { build } from "esbuild";
import { convertToModelMessages, streamText } from "ai";
import { MockLanguageModelV3 } from "ai/test";
import { relayUIMessageStream } from "@relayd/client/ai";
import { Producer, mintToken } from "@relayd/client/producer";

const RELAYD_URL = process.env.RELAYD_URL ?? "http://127.0.0.1:8080";
const WORD_MS = Number(process.env.WORD_MS ?? 120);
const HOLD_AFTER = Number(process.env.HOLD_AFTER ?? 0);
const ANSWER = ("relayd keeps this answer going in the background: the model call runs in the server, "
  + "every word is stored in relayd, and the page reads them from there. Reload the page now and "
  + "it picks up where it was; press Stop and the model call is cancelled.").split(/(?<= )/);

const producer = new Producer({ url: RELAYD_URL, apiKey: process.env.RELAYD_API_KEY });
const stats = { started: 0, completed: 0, cancelled: 0, aborted: 0 };
let release = () => {};
const held = new Promise((resolve) => { release = resolve; });

const usage = { inputTokens: { total: 0, noCache: 0, cacheRead: 0, cacheWrite: 0 }, outputTokens: { total: 0, text: 0, reasoning: 0 } };

/** The demo model: streams ANSWER word by word and stops when its abortSignal aborts. */
function model() {
  return new MockLanguageModelV3({
    doStream: async ({ abortSignal }) => ({
      stream: new ReadableStream({
        async start(controller) {
          controller.enqueue({ type: "stream-start", warnings: [] });
          controller.enqueue({ type: "text-start", id: "0" });
          for (const [i, word] of ANSWER.entries()) {
            if (i === HOLD_AFTER && HOLD_AFTER > 0) await held;
            await new Promise((resolve) => setTimeout(resolve, WORD_MS));
            if (abortSignal?.aborted) {
              stats.aborted += 1;
              return controller.error(abortSignal.reason);
            }
            controller.enqueue({ type: "text-delta", id: "0", delta: word });
          }
          controller.enqueue({ type: "text-end", id: "0" });
          controller.enqueue({ type: "finish", finishReason: { unified: "stop", raw: "stop" }, usage });
          controller.close();
        },
      }),
    }),
  });
}

/** POST /api/chat: start the answer in the background, hand the page its stream and a token. */
async function chat(req, res) {
  let body = "";
  for await (const part of req) body += part;
  const { id, messages } = JSON.parse(body);
  const streamId = `chat/${String(id).replace(/[^A-Za-z0-9_-]/g, "")}/${randomUUID()}`;
  stats.started += 1;
  relayUIMessageStream(producer, streamId, async (signal) =>
    streamText({ model: model(), messages: await convertToModelMessages(messages), abortSignal: signal })
      .toUIMessageStream(),
  ).then((result) => { stats[result.reason] = (stats[result.reason] ?? 0) + 1; }, (err) => console.error(err));
  // A token for this stream only, which may cancel it (Stop).
  const token = mintToken(process.env.RELAYD_JWT_SECRET, [streamId], { rights: ["read", "cancel"], ttlS: 3600 });
  json(res, { streamId, token, url: RELAYD_URL });
}

function json(res, value) {
  res.writeHead(200, { "Content-Type": "application/json" }).end(JSON.stringify(value));
}

const here = new URL(".", import.meta.url);
const page = await readFile(new URL("index.html", here));
const { outputFiles: [bundle] } = await build({
  entryPoints: [new URL("app.mjs", here).pathname], bundle: true, format: "esm", write: false, target: "es2022",
  absWorkingDir: here.pathname, logLevel: "warning",
});

const server = http.createServer(async (req, res) => {
  try {
    if (req.method === "POST" && req.url === "/api/chat") return await chat(req, res);
    if (req.method === "GET" && req.url === "/api/stats") return json(res, stats);
    if (req.method === "POST" && req.url === "/api/release") return (release(), json(res, {}));
    if (req.method === "GET" && req.url === "/app.js") return res.writeHead(200, { "Content-Type": "text/javascript" }).end(bundle.contents);
    if (req.method === "GET" && (req.url === "/" || req.url.startsWith("/?"))) return res.writeHead(200, { "Content-Type": "text/html" }).end(page);
    res.writeHead(404).end();
  } catch (err) {
    console.error(err);
    res.writeHead(500).end(String(err));
  }
});
server.listen(Number(process.env.PORT ?? 3000), "127.0.0.1", () => {
  console.log(`listening on http://127.0.0.1:${server.address().port}`);
});
for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, () => { server.close(); producer.close().finally(() => process.exit(0)); });
}
