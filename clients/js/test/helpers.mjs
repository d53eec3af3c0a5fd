// Shared by the node tests: relayd's address from the environment (tests/test_js_sdk.py starts a
// real relayd and runs `node --test` with it), unique stream ids, and a TCP proxy that can drop
// every connection through it or hold back what relayd sends.
import net from "node:net";
import { randomBytes } from "node:crypto";

export const RELAYD_URL = need("RELAYD_URL");
export const API_KEY = need("RELAYD_API_KEY");
export const JWT_SECRET = need("RELAYD_JWT_SECRET");

function need(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run these tests through tests/test_js_sdk.py`);
  return value;
}

export function streamId(name) {
  return `js-${name}-${randomBytes(4).toString("hex")}`;
}

/**
 * A TCP proxy to relayd on 127.0.0.1 port 0. `drop()` resets every connection through it (a
 * network failure, as the client sees one); `hold()` keeps back what relayd sends (read from
 * relayd, so relayd sees it taken, but not passed on) until `release()`.
 */
export async function tcpProxy() {
  const target = new URL(RELAYD_URL);
  const sockets = new Set();
  let connections = 0;
  let held = null; // [client socket, data (null: relayd's end)] while holding
  const server = net.createServer((client) => {
    connections += 1;
    const upstream = net.connect(Number(target.port), target.hostname);
    for (const [a, b] of [[client, upstream], [upstream, client]]) {
      sockets.add(a);
      a.on("error", () => {});
      a.on("close", () => { sockets.delete(a); b.destroy(); });
    }
    client.pipe(upstream);
    const pass = (data) => (data === null ? client.end() : client.write(data));
    upstream.on("data", (data) => (held ? held.push([client, data]) : pass(data)));
    upstream.on("end", () => (held ? held.push([client, null]) : pass(null)));
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    get connections() { return connections; },
    get heldBytes() { return (held ?? []).reduce((n, [, data]) => n + (data?.length ?? 0), 0); },
    drop() { for (const s of sockets) s.resetAndDestroy?.() ?? s.destroy(); },
    hold() { held ??= []; },
    release() {
      const kept = held ?? [];
      held = null;
      for (const [client, data] of kept) if (!client.destroyed) (data === null ? client.end() : client.write(data));
    },
    close() { this.drop(); return new Promise((resolve) => server.close(resolve)); },
  };
}

/** Resolves when `predicate()` holds, checked on every event-loop turn (at most `ms`). */
export async function until(predicate, what, ms = 5000) {
  const deadline = Date.now() + ms;
  while (!(await predicate())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}
