// relayd browser client 0.1.0: GENERATED from clients/js/src (browser.ts) by
// clients/js/build-browser.mjs. Do not edit: change the TypeScript source and run `npm run build`
// in clients/js. Served by relayd at /v1/client.js; docs/clients.md, "Browser client".

// src/errors.ts
var RelaydError = class extends Error {
  code;
  /** gap: the last cursor received and the oldest one still stored */
  cursor;
  next;
  /** reset: why the stream was replaced; a stream error: its end reason */
  reason;
  /** the stream the error is about, when known */
  stream;
  constructor(code, message, details = {}) {
    super(message || code, "cause" in details ? { cause: details.cause } : void 0);
    this.name = "RelaydError";
    this.code = code;
    Object.assign(this, details);
  }
};

// src/jwt.ts
function jwtClaims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const json = atob(part + "=".repeat((4 - part.length % 4) % 4));
    const bytes = Uint8Array.from(json, (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === "object" ? claims : null;
  } catch {
    return null;
  }
}
function allows(claims, stream, right) {
  const rights = Array.isArray(claims.rights) ? claims.rights : ["read"];
  if (!rights.includes(right)) return false;
  const streams = Array.isArray(claims.streams) ? claims.streams : [];
  return streams.some((s) => s === "*" || s === stream || s.endsWith("*") && stream.startsWith(s.slice(0, -1)));
}

// src/protocol.ts
var SUBPROTOCOL = "relayd.v1";
var BEARER_PROTOCOL = "bearer.";
var PATHS = {
  ingest: "/v1/ingest",
  consume: "/v1/ws",
  tokens: "/v1/tokens",
  client: "/v1/client.js"
};
var CLOSE_CODES = {
  NORMAL: 1e3,
  MESSAGE_TOO_BIG: 1009,
  SERVICE_RESTART: 1012,
  UNAUTHORIZED: 4001,
  TOKEN_EXPIRED: 4002,
  FORBIDDEN: 4003,
  SLOW_CONSUMER: 4008
};
var MAX_EXACT_INT = Number.MAX_SAFE_INTEGER;
function parseMessage(data) {
  const text = typeof data === "string" ? data : String(data);
  const frames = [];
  for (const line of text.split("\n")) {
    if (line.trim()) frames.push(JSON.parse(line));
  }
  return frames;
}

// src/websocket.ts
var OPEN = 1;
async function resolveWebSocket(given) {
  if (given) return given;
  const global = globalThis.WebSocket;
  if (typeof global === "function") return global;
  return await nodeWebSocket() ?? missing();
}
async function nodeWebSocket() {
  try {
    const mod = await import("ws");
    return mod.default ?? mod.WebSocket;
  } catch {
    return null;
  }
}
function missing() {
  throw new TypeError("relayd: no WebSocket in this runtime: install the `ws` package or pass `WebSocket`");
}

// src/consumer.ts
var FATAL = /* @__PURE__ */ new Set([
  "stream_not_found",
  "forbidden",
  "unauthorized",
  "bad_frame",
  "invalid_stream_id",
  "too_many_streams",
  "unknown_op"
]);
var CANCEL_REFUSALS = /* @__PURE__ */ new Set(["forbidden", "stream_ended"]);
var MAX_TIMER_MS = 2 ** 31 - 1;
var CANCEL_LINGER_MS = 5e3;
function connect(options) {
  if (!options || !options.streamId) throw new TypeError("connect: streamId is required");
  const connection = new Connection(options, true);
  return connection.subscribe(options.streamId, options);
}
function openConnection(options = {}) {
  return new Connection(options, false);
}
var Connection = class {
  #opts;
  #owned;
  // made by connect(): closed with its only subscription
  #wsUrl;
  #backoff;
  #heartbeatMs;
  #maxRetries;
  #subs = /* @__PURE__ */ new Map();
  #ws = null;
  #status = "idle";
  #attempt = 0;
  #token;
  #freshToken = false;
  // fetched for this connection and not yet accepted by relayd
  #lastCause = null;
  // the error frame that made us drop the connection
  #retryTimer;
  #refreshTimer;
  #beatTimer;
  #refreshFailures = 0;
  #lastFrameAt = 0;
  #heard = false;
  // any frame since the last ping
  constructor(opts, owned = false) {
    this.#opts = opts;
    this.#owned = owned;
    const origin = globalThis.location?.origin;
    const raw = opts.url || origin;
    if (!raw) throw new TypeError("relayd: `url` is required outside a browser page");
    const base = new URL(raw);
    base.protocol = base.protocol.replace(/^http/, "ws");
    this.#wsUrl = base.origin + base.pathname.replace(/\/+$/, "") + PATHS.consume;
    this.#backoff = { initialMs: 250, maxMs: 5e3, ...opts.backoff };
    this.#heartbeatMs = Math.min(opts.heartbeatMs ?? 2e4, MAX_TIMER_MS);
    this.#maxRetries = opts.maxRetries ?? Infinity;
    this.#token = opts.token || null;
  }
  get status() {
    return this.#status;
  }
  /** Follow `streamId` on this connection (the token must cover it). */
  subscribe(streamId, options = {}) {
    if (!streamId) throw new TypeError("subscribe: streamId is required");
    if (this.#status === "closed") throw new RelaydError("closed", "the connection is closed");
    if (this.#subs.has(streamId)) throw new RelaydError("bad_frame", `already following ${streamId} on this connection`);
    const sub = new Subscription(this, streamId, options);
    if (sub.status === "closed") return sub;
    this.#subs.set(streamId, sub);
    if (this.#status === "idle") {
      this.#status = "connecting";
      this.#scheduleRefresh();
      void this.#open();
    } else if (this.#ws?.readyState === OPEN) {
      sub._onSocketOpen();
    }
    return sub;
  }
  /** Close the websocket and every subscription on it (their `ended` rejects with "closed"). */
  close() {
    if (this.#status === "closed") return;
    for (const sub of [...this.#subs.values()]) sub.close();
    this.#shutdown();
  }
  // used by Subscription -------------------------------------------------------------------
  /** @internal */
  _send(op) {
    const ws = this.#ws;
    if (!ws || ws.readyState !== OPEN) return false;
    ws.send(JSON.stringify(op));
    return true;
  }
  /** @internal a delivery: relayd and its store work, the backoff starts over */
  _progress() {
    this.#attempt = 0;
  }
  /** @internal whether the current token (as far as it can be read) lets us cancel `stream` */
  _mayCancel(stream) {
    const claims = this.#token ? jwtClaims(this.#token) : null;
    return claims === null || allows(claims, stream, "cancel");
  }
  /** @internal a transient error on one stream: drop the socket, resubscribe everything after a backoff */
  _drop(cause) {
    this.#lastCause = cause;
    this.#ws?.close();
  }
  /** @internal the subscription is over: stop routing frames to it */
  _remove(sub, unsubscribe) {
    if (this.#subs.get(sub.streamId) !== sub) return;
    this.#subs.delete(sub.streamId);
    if (unsubscribe) this._send({ op: "unsubscribe", stream: sub.streamId });
    if (this.#owned && this.#subs.size === 0) this.#shutdown();
  }
  // the socket -----------------------------------------------------------------------------
  #subscriptions() {
    return [...this.#subs.values()];
  }
  async #open() {
    if (this.#status === "closed") return;
    let WS;
    try {
      if (!this.#token && this.#opts.fetchToken) {
        await this.#refreshToken(false);
        this.#freshToken = true;
      }
      WS = await resolveWebSocket(this.#opts.WebSocket);
    } catch (err) {
      console.warn("relayd: fetchToken failed", err);
      return this.#retry(err instanceof RelaydError ? err : new RelaydError("closed", String(err), { cause: err }));
    }
    if (this.#status === "closed") return;
    const protocols = this.#token ? [SUBPROTOCOL, BEARER_PROTOCOL + this.#token] : [SUBPROTOCOL];
    let ws;
    try {
      ws = new WS(this.#wsUrl, protocols);
    } catch (err) {
      return this.#failAll(new RelaydError("bad_frame", `cannot open ${this.#wsUrl}: ${err}`, { cause: err }));
    }
    this.#ws = ws;
    this.#startHeartbeat(ws);
    ws.onopen = () => {
      if (ws !== this.#ws) return;
      this.#status = "open";
      for (const sub of this.#subscriptions()) sub._onSocketOpen();
    };
    ws.onmessage = (event) => {
      if (ws !== this.#ws) return;
      this.#lastFrameAt = Date.now();
      this.#heard = true;
      for (const frame of parseMessage(event.data)) {
        if (ws === this.#ws) this.#onFrame(frame);
      }
    };
    ws.onerror = () => {
    };
    ws.onclose = (event) => {
      if (ws === this.#ws) this.#onClose(event.code, event.reason);
    };
  }
  #onFrame(frame) {
    if (frame.stream !== void 0) {
      this.#subs.get(frame.stream)?._onFrame(frame);
      if (frame.type === "subscribed") this.#freshToken = false;
      return;
    }
    if (frame.type === "error") {
      console.warn("relayd:", frame.code, frame.message);
    } else if (frame.type === "authed") {
      this.#freshToken = false;
    }
  }
  #onClose(code, reason) {
    this.#ws = null;
    if (this.#status === "closed") return;
    if (code === CLOSE_CODES.FORBIDDEN) return this.#failAll(new RelaydError("forbidden", reason || "forbidden"));
    if (code === CLOSE_CODES.UNAUTHORIZED || code === CLOSE_CODES.TOKEN_EXPIRED) {
      const what = code === CLOSE_CODES.UNAUTHORIZED ? "unauthorized" : "token_expired";
      if (!this.#opts.fetchToken || this.#freshToken) {
        return this.#failAll(new RelaydError(what, `relayd refused the token (${what})`));
      }
      this.#token = null;
    }
    const cause = this.#lastCause || new RelaydError("closed", `the connection closed (${code} ${reason})`.trim());
    this.#lastCause = null;
    this.#retry(cause);
  }
  /**
   * Reconnect after an exponential, jittered delay; every subscription resumes after the last
   * chunk it received. `#attempt` counts the reconnects since one last delivered something;
   * past maxRetries every subscription fails (with the error that caused the last one).
   */
  #retry(cause) {
    if (this.#status === "closed") return;
    clearInterval(this.#beatTimer);
    if (this.#attempt >= this.#maxRetries) {
      return this.#failAll(new RelaydError(
        "retries_exhausted",
        `gave up after ${this.#attempt} reconnects in a row without a delivery: ${cause.message}`,
        { cause }
      ));
    }
    this.#status = "reconnecting";
    for (const sub of this.#subscriptions()) sub._onSocketLost();
    const { initialMs, maxMs } = this.#backoff;
    const ceiling = Math.min(maxMs, initialMs * 2 ** Math.min(this.#attempt++, 30), MAX_TIMER_MS);
    this.#retryTimer = setTimeout(() => void this.#open(), ceiling / 2 + Math.random() * (ceiling / 2));
  }
  /**
   * Every heartbeatMs: send a `ping` op; if nothing at all arrived for twice that, the connection
   * is dead (half-open TCP: a sleeping laptop, a NAT entry dropped) though the runtime still calls
   * it open. Drop it without waiting for a close handshake that will never complete, and resume
   * on a new one. A socket that never opens is given up the same way. `#heard` keeps throttled
   * timers (background tabs tick once a minute) from counting their own delay as silence.
   */
  #startHeartbeat(ws) {
    clearInterval(this.#beatTimer);
    this.#lastFrameAt = Date.now();
    this.#heard = false;
    if (!(this.#heartbeatMs > 0)) return;
    this.#beatTimer = setInterval(() => {
      if (ws !== this.#ws) return clearInterval(this.#beatTimer);
      if (!this.#heard && Date.now() - this.#lastFrameAt >= 2 * this.#heartbeatMs) {
        console.warn(`relayd: nothing received for ${Date.now() - this.#lastFrameAt} ms; reconnecting`);
        clearInterval(this.#beatTimer);
        this.#ws = null;
        ws.close();
        return this.#retry(new RelaydError("timeout", "nothing received from relayd"));
      }
      this.#heard = false;
      this._send({ op: "ping" });
    }, this.#heartbeatMs);
  }
  // tokens ---------------------------------------------------------------------------------
  async #refreshToken(sendAuth) {
    const token = await this.#opts.fetchToken();
    if (typeof token !== "string" || !token) throw new TypeError("fetchToken must return a JWT string");
    this.#token = token;
    if (sendAuth) this._send({ op: "auth", token });
    this.#scheduleRefresh();
  }
  /** With fetchToken: replace the token on the open connection before it expires. */
  #scheduleRefresh() {
    clearTimeout(this.#refreshTimer);
    const claims = this.#token && this.#opts.fetchToken ? jwtClaims(this.#token) : null;
    if (this.#status === "closed" || !claims || typeof claims.exp !== "number") return;
    const remainingMs = claims.exp * 1e3 - Date.now();
    const delay = Math.min(Math.max(remainingMs - Math.min(6e4, remainingMs / 3), 1e3), MAX_TIMER_MS);
    this.#refreshTimer = setTimeout(() => {
      this.#refreshToken(true).then(() => {
        this.#refreshFailures = 0;
      }, (err) => {
        console.warn("relayd: token refresh failed; retrying", err);
        const { initialMs, maxMs } = this.#backoff;
        const wait = Math.min(maxMs, initialMs * 2 ** Math.min(this.#refreshFailures++, 30), MAX_TIMER_MS);
        this.#refreshTimer = setTimeout(() => this.#scheduleRefresh(), wait);
      });
    }, delay);
  }
  // the end --------------------------------------------------------------------------------
  #failAll(err) {
    for (const sub of this.#subscriptions()) sub._fail(err);
    this.#shutdown();
  }
  #shutdown() {
    if (this.#status === "closed") return;
    this.#status = "closed";
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#refreshTimer);
    clearInterval(this.#beatTimer);
    const ws = this.#ws;
    this.#ws = null;
    if (ws && ws.readyState <= OPEN) ws.close(1e3);
  }
};
var Subscription = class {
  streamId;
  /** Settles once: resolves with the End relayd reported, rejects with the error that ended it. */
  ended;
  #conn;
  #opts;
  #store;
  #storageKey;
  #status = "connecting";
  #received;
  // cursor of the last chunk received from relayd
  #cursor;
  // cursor of the last chunk handed to the loop
  #queue = [];
  #wakers = [];
  #done = false;
  // the iteration is over (more items may wait in the queue)
  #lastLoss = null;
  #cancels = [];
  #lingering = null;
  // aborted with cancelOnAbort: waits for relayd to confirm
  #settleEnd;
  /** @internal use `connect()` or `connection.subscribe()` */
  constructor(conn, streamId, opts) {
    this.#conn = conn;
    this.streamId = streamId;
    this.#opts = opts;
    this.#store = cursorStore(opts.persist);
    this.#storageKey = `relayd:cursor:${streamId}`;
    const stored = this.#store?.getItem(this.#storageKey) ?? null;
    this.#cursor = [opts.cursor, stored].filter((c) => !!c).sort().pop() ?? null;
    this.#received = this.#cursor;
    this.ended = new Promise((resolve, reject) => {
      this.#settleEnd = { resolve, reject };
    });
    this.ended.catch(() => {
    });
    const signal = opts.signal;
    if (signal?.aborted) {
      this.#status = "closed";
      this.#finish(new RelaydError("closed", "closed by the client"), false);
      return;
    }
    signal?.addEventListener("abort", () => this.#onAbort(), { once: true });
  }
  /** Cursor of the last chunk handed to your loop (or of the end once the loop reached it). */
  get cursor() {
    return this.#cursor;
  }
  get status() {
    return this.#status;
  }
  [Symbol.asyncIterator]() {
    return this;
  }
  async next() {
    for (; ; ) {
      if (!this.#queue.length && !this.#done) await new Promise((wake) => this.#wakers.push(wake));
      const item = this.#queue.shift();
      if (!item) return { done: true, value: void 0 };
      if ("error" in item) throw item.error;
      if ("loss" in item) {
        this.#opts.onLoss(item.loss);
        continue;
      }
      this.#cursor = "end" in item ? item.end.cursor || this.#cursor : item.cursor;
      if (this.#store && this.#cursor) this.#store.setItem(this.#storageKey, this.#cursor);
      return "end" in item ? { done: true, value: void 0 } : { done: false, value: item.value };
    }
  }
  /** Leaving a `for await` loop early (break, throw) closes the subscription. */
  async return() {
    this.close();
    return { done: true, value: void 0 };
  }
  /**
   * Ask the producer to stop (the token needs the "cancel" right). Resolves when relayd
   * accepted the request; the stream then ends with reason "cancelled".
   */
  cancel() {
    if (this.#done) return Promise.reject(new RelaydError("closed", "the subscription is over"));
    return new Promise((resolve, reject) => {
      this.#cancels.push({ resolve, reject });
      if (this.#status === "live") this.#conn._send({ op: "cancel", stream: this.streamId });
    });
  }
  /** Stop following: ends the iteration; `ended` rejects with "closed" if it had not ended. */
  close() {
    if (this.#lingering) return;
    if (this.#status !== "ended") this.#status = "closed";
    this.#finish(new RelaydError("closed", "closed by the client"), false);
    this.#conn._remove(this, true);
  }
  // driven by the connection ---------------------------------------------------------------
  /** @internal */
  _onSocketOpen() {
    if (this.#lingering) {
      this.#conn._send({ op: "cancel", stream: this.streamId });
      return;
    }
    const op = { op: "subscribe", stream: this.streamId };
    if (this.#received) op.cursor = this.#received;
    if (this.#opts.waitMs != null) op.wait_ms = this.#opts.waitMs;
    this.#conn._send(op);
  }
  /** @internal */
  _onSocketLost() {
    if (!this.#done) this.#status = "reconnecting";
  }
  /** @internal a fatal error: the chunks already received are still handed out, then the iterator throws */
  _fail(err) {
    if (this.#lingering) return this.#stopLingering();
    if (this.#done) return;
    this.#status = "closed";
    this.#queue.push({ error: err });
    this.#finish(err, true);
    this.#conn._remove(this, false);
  }
  /** @internal */
  _onFrame(frame) {
    if (this.#lingering) return this.#onLingeringFrame(frame);
    if (this.#done) return;
    const conn = this.#conn;
    switch (frame.type) {
      case "subscribed":
        this.#status = "live";
        for (let i = 0; i < this.#cancels.length; i++) conn._send({ op: "cancel", stream: this.streamId });
        break;
      case "chunk": {
        conn._progress();
        const cursor = frame.cursor;
        if (this.#received && cursor <= this.#received) return;
        this.#received = cursor;
        let value;
        try {
          value = this.#opts.decoder ? this.#opts.decoder(frame.data) : frame.data;
        } catch (err) {
          return this._fail(err);
        }
        this.#push({ value, cursor });
        break;
      }
      case "end": {
        conn._progress();
        const end = { reason: frame.reason, cursor: frame.cursor };
        if (frame.message != null) end.message = frame.message;
        this.#status = "ended";
        for (const c of this.#cancels.splice(0)) c.resolve();
        this.#settleEnd.resolve(end);
        this.#push({ end });
        this.#finish(null, true);
        conn._remove(this, false);
        break;
      }
      case "cancel_requested":
        this.#cancels.shift()?.resolve();
        break;
      case "gap":
      case "reset":
        this.#onLoss(frame);
        break;
      case "error":
        this.#onError(frame);
        break;
      default:
    }
  }
  #onLoss(frame) {
    const loss = frame.type === "gap" ? new RelaydError(
      "gap",
      `chunks between ${frame.cursor} and ${frame.next} are gone`,
      { cursor: frame.cursor, next: frame.next, stream: this.streamId }
    ) : new RelaydError(
      "reset",
      `the stream was replaced (${frame.reason})`,
      { reason: frame.reason, stream: this.streamId }
    );
    if (!this.#opts.onLoss) return this._fail(loss);
    this.#conn._progress();
    const key = JSON.stringify([frame.type, frame.cursor, frame.next]);
    if (key === this.#lastLoss) return;
    this.#lastLoss = key;
    if (frame.type === "reset") this.#received = null;
    this.#push({ loss });
  }
  #onError(frame) {
    const code = String(frame.code);
    const err = new RelaydError(code, frame.message, { stream: this.streamId });
    if (this.#cancels.length && CANCEL_REFUSALS.has(code)) {
      this.#cancels.shift().reject(err);
    } else if (FATAL.has(code)) {
      this._fail(err);
    } else {
      this.#conn._drop(err);
    }
  }
  // abort ----------------------------------------------------------------------------------
  #onAbort() {
    if (this.#done) return;
    if (!this.#opts.cancelOnAbort || !this.#conn._mayCancel(this.streamId)) return this.close();
    this.#status = "closed";
    this.#finish(new RelaydError("closed", "aborted: the stream was asked to cancel"), false);
    const timer = setTimeout(() => this.#stopLingering(), CANCEL_LINGER_MS);
    this.#lingering = { resolve: () => clearTimeout(timer), reject: () => clearTimeout(timer) };
    this.#conn._send({ op: "cancel", stream: this.streamId });
  }
  #onLingeringFrame(frame) {
    if (frame.type === "cancel_requested" || frame.type === "end" || frame.type === "error") this.#stopLingering();
  }
  #stopLingering() {
    const lingering = this.#lingering;
    if (!lingering) return;
    this.#lingering = null;
    lingering.resolve();
    this.#conn._remove(this, true);
  }
  // iteration ------------------------------------------------------------------------------
  #push(item) {
    this.#queue.push(item);
    for (const wake of this.#wakers.splice(0)) wake();
  }
  #finish(err, keepQueue) {
    if (this.#done) return;
    this.#done = true;
    if (err) this.#settleEnd.reject(err);
    const why = err || new RelaydError("closed", "the subscription is over");
    for (const c of this.#cancels.splice(0)) c.reject(why);
    if (!keepQueue) this.#queue.length = 0;
    for (const wake of this.#wakers.splice(0)) wake();
  }
};
function cursorStore(persist) {
  if (!persist) return null;
  if (typeof persist === "object") return persist;
  const storage = globalThis[persist === "local" ? "localStorage" : "sessionStorage"];
  if (!storage) throw new TypeError(`relayd: persist "${persist}" needs ${persist}Storage: pass a CursorStore instead`);
  return storage;
}

// src/openai.ts
function openaiText(chunk) {
  if (typeof chunk === "string") return chunk;
  if (!chunk || typeof chunk !== "object") return "";
  const c = chunk;
  const choice = Array.isArray(c.choices) ? c.choices[0] : void 0;
  const text = choice?.delta?.content ?? choice?.text ?? (c.type === "response.output_text.delta" ? c.delta : void 0);
  return typeof text === "string" ? text : "";
}
async function* textDeltas(source) {
  for await (const chunk of source) {
    const text = openaiText(chunk);
    if (text) yield text;
  }
}

// src/browser.ts
var SERVED_AT = /\/v1\/client\.js(?:[?#].*)?$/;
var MODULE_BASE = SERVED_AT.test(import.meta.url) ? import.meta.url.replace(SERVED_AT, "") : new URL(import.meta.url).origin;
function connect2(options) {
  return connect({ ...options, url: options?.url || MODULE_BASE });
}
function openConnection2(options = {}) {
  return openConnection({ ...options, url: options.url || MODULE_BASE });
}
export {
  Connection,
  RelaydError,
  Subscription,
  connect2 as connect,
  openConnection2 as openConnection,
  openaiText,
  textDeltas
};
