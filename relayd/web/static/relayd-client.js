/**
 * relayd browser client: follow one relayd stream over a websocket, in order, once each,
 * across drops, relayd restarts, token expiry and page reloads.
 *
 *     import { connect, textDeltas } from "https://relayd.example.com/v1/client.js";
 *     const sub = connect({ streamId: "chat-42", fetchToken, persist: "session" });
 *     for await (const chunk of sub) render(chunk);
 *     const { reason } = await sub.ended;
 *
 * No dependencies; speaks docs/protocol.md ("relayd.v1"). Served by relayd at /v1/client.js.
 *
 * Backpressure: frames that arrive while your loop is busy are buffered in memory by the
 * iterator (relayd's own flow control stops at the socket: browsers read websockets eagerly).
 * A stream is one model answer, so this is small; do not leave a subscription un-iterated.
 *
 * @module relayd-client
 */

const SUBPROTOCOL = "relayd.v1";
/** relayd's base URL when this module was loaded from its /v1/client.js (a path prefix is kept). */
const SERVED_AT = /\/v1\/client\.js(?:[?#].*)?$/;
const MODULE_BASE = SERVED_AT.test(import.meta.url)
  ? import.meta.url.replace(SERVED_AT, "")
  : new URL(import.meta.url).origin;
/** Error codes after which retrying cannot help: the iterator throws, `ended` rejects. */
const FATAL = new Set(["stream_not_found", "forbidden", "unauthorized", "bad_frame", "invalid_stream_id",
  "too_many_streams", "unknown_op"]);
/** setTimeout fires at once for delays above 2^31-1 ms (~24.8 days): longer waits are capped. */
const MAX_TIMER_MS = 2 ** 31 - 1;
/** Error codes that answer a refused `cancel` (the subscription goes on). */
const CANCEL_REFUSALS = new Set(["forbidden", "stream_ended"]);

/**
 * An error that ended a subscription: `code` is relayd's error code (docs/protocol.md), or
 * "gap", "reset", "closed" (you called close()).
 */
export class RelaydError extends Error {
  /** @param {string} code @param {string} message @param {object} [details] */
  constructor(code, message, details = {}) {
    super(message || code);
    this.name = "RelaydError";
    this.code = code;
    Object.assign(this, details);
  }
}

/**
 * @typedef {object} ConnectOptions
 * @property {string} streamId                 the stream to follow
 * @property {string} [url]                    relayd's base URL (http(s):// or ws(s)://); default: the relayd this module was loaded from
 * @property {string} [token]                  a consumer JWT
 * @property {() => (string|Promise<string>)} [fetchToken]  returns a fresh JWT: called when there is
 *   no token, when relayd refuses one (close 4001/4002) and shortly before the current one expires
 * @property {string} [cursor]                 resume after this cursor (default: from the start)
 * @property {"session"} [persist]             keep the cursor in sessionStorage ("relayd:cursor:<streamId>")
 * @property {(data: any) => any} [decoder]    maps each chunk's `data` (already JSON-parsed) to what you get
 * @property {AbortSignal} [signal]            abort closes the subscription
 * @property {number} [waitMs]                 how long relayd waits for a stream that does not exist yet
 * @property {(loss: RelaydError) => void} [onLoss]  accept lost history and read on: called, in order,
 *   with a "gap" (trimmed/expired chunks) or "reset" (stream replaced) error. Without it, a loss
 *   ends the subscription: the iterator throws it and `ended` rejects with it.
 * @property {{initialMs?: number, maxMs?: number}} [backoff]  reconnect delays (default 250 ms .. 5 s)
 * @property {number} [heartbeatMs]            send a `ping` op this often (default 20 s; 0: never) and
 *   reconnect when nothing at all arrived for twice that: browsers answer relayd's websocket pings
 *   without telling the page, so only this notices a connection that died silently
 * @property {number} [maxRetries]             give up after this many reconnects in a row that
 *   delivered nothing (default: Infinity): the iterator throws, `ended` rejects, code "retries_exhausted"
 */

/**
 * @typedef {object} End
 * @property {"completed"|"error"|"cancelled"|"producer_lost"} reason
 * @property {string} [message]
 * @property {string} cursor
 */

/**
 * Follow a stream. Returns at once; the connection opens in the background.
 * @param {ConnectOptions} options
 * @returns {Subscription}
 */
export function connect(options) {
  return new Subscription(options);
}

/**
 * One followed stream: an async iterable of its decoded chunks (single consumer), plus
 * `cursor`, `status`, `ended`, `cancel()` and `close()`.
 */
export class Subscription {
  #opts; #wsUrl; #storageKey; #backoff; #heartbeatMs; #maxRetries;
  #ws = null; #status = "connecting"; #attempt = 0; #retryTimer = null; #refreshTimer = null;
  #beatTimer = null; #refreshFailures = 0; #lastFrameAt = 0; #heard = false; // heartbeat: time of the last frame, any frame since the last ping
  #lastCause = null; // the error frame that made us drop the connection, for retries_exhausted
  #token; #received; #cursor; #queue = []; #wakers = []; #done = false; #lastLoss = null;
  #freshToken = false; // fetched for this connection and not yet accepted by relayd
  #cancels = []; #settleEnd;

  /** @param {ConnectOptions} opts */
  constructor(opts) {
    if (!opts || !opts.streamId) throw new TypeError("connect: streamId is required");
    this.#opts = opts;
    const base = new URL(opts.url || MODULE_BASE);
    base.protocol = base.protocol.replace(/^http/, "ws");
    this.#wsUrl = base.origin + base.pathname.replace(/\/+$/, "") + "/v1/ws";
    this.#backoff = { initialMs: 250, maxMs: 5000, ...opts.backoff };
    this.#heartbeatMs = Math.min(opts.heartbeatMs ?? 20_000, MAX_TIMER_MS);
    this.#maxRetries = opts.maxRetries ?? Infinity;
    this.#storageKey = opts.persist === "session" ? `relayd:cursor:${opts.streamId}` : null;
    const stored = this.#storageKey ? sessionStorage.getItem(this.#storageKey) : null;
    // Cursors of one stream sort in append order: start after the later of the two.
    this.#cursor = [opts.cursor, stored].filter(Boolean).sort().pop() || null;
    this.#received = this.#cursor;
    this.#token = opts.token || null;
    /** Settles once: resolves with the End relayd reported, rejects with the error that ended it. */
    this.ended = new Promise((resolve, reject) => { this.#settleEnd = { resolve, reject }; });
    this.ended.catch(() => {}); // not awaiting `ended` is fine: no unhandled-rejection noise
    if (opts.signal?.aborted) { this.close(); return; }
    opts.signal?.addEventListener("abort", () => this.close(), { once: true });
    this.#scheduleRefresh();
    this.#open();
  }

  /** Cursor of the last chunk handed to your loop (or of the end once the loop reached it). */
  get cursor() { return this.#cursor; }

  /** "connecting" | "live" | "reconnecting" | "ended" | "closed" */
  get status() { return this.#status; }

  [Symbol.asyncIterator]() { return this; }

  /** @returns {Promise<IteratorResult<any>>} */
  async next() {
    for (;;) {
      if (!this.#queue.length && !this.#done) await new Promise((wake) => this.#wakers.push(wake));
      const item = this.#queue.shift();
      if (!item) return { done: true, value: undefined };
      if (item.error) throw item.error;
      if (item.loss) {
        this.#opts.onLoss(item.loss); // in order: after the chunks before the loss were handled
        continue;
      }
      this.#cursor = item.end ? item.end.cursor || this.#cursor : item.cursor;
      // Stored as the chunk is handed over: render it synchronously in your loop and a reload
      // resumes exactly after it. After the end the end's cursor stays, so a reload gets `end` only.
      if (this.#storageKey && this.#cursor) sessionStorage.setItem(this.#storageKey, this.#cursor);
      return item.end ? { done: true, value: undefined } : { done: false, value: item.value };
    }
  }

  /** Leaving a `for await` loop early (break, throw) closes the subscription. */
  async return() {
    this.close();
    return { done: true, value: undefined };
  }

  /**
   * Ask the producer to stop (the token needs the "cancel" right). Resolves when relayd
   * accepted the request; the stream then ends with reason "cancelled".
   * @returns {Promise<void>}
   */
  cancel() {
    if (this.#done) return Promise.reject(new RelaydError("closed", "the subscription is over"));
    return new Promise((resolve, reject) => {
      this.#cancels.push({ resolve, reject });
      if (this.#status === "live") this.#send({ op: "cancel", stream: this.#opts.streamId });
    });
  }

  /** Stop following: closes the websocket, ends the iteration; `ended` rejects if it had not ended. */
  close() {
    if (this.#status !== "ended") this.#status = "closed";
    this.#finish(new RelaydError("closed", "closed by the client"), false);
  }

  // connection ------------------------------------------------------------------------------

  async #open() {
    if (this.#done) return;
    try {
      if (!this.#token && this.#opts.fetchToken) {
        await this.#refreshToken(false);
        this.#freshToken = true;
      }
    } catch (err) {
      console.warn("relayd: fetchToken failed", err);
      return this.#retry(err);
    }
    if (this.#done) return;
    const protocols = this.#token ? [SUBPROTOCOL, `bearer.${this.#token}`] : [SUBPROTOCOL];
    let ws;
    try {
      ws = new WebSocket(this.#wsUrl, protocols);
    } catch (err) {
      return this.#fail(err); // a malformed URL or token: retrying cannot help
    }
    this.#ws = ws;
    this.#startHeartbeat(ws);
    ws.onopen = () => {
      const op = { op: "subscribe", stream: this.#opts.streamId };
      if (this.#received) op.cursor = this.#received;
      if (this.#opts.waitMs != null) op.wait_ms = this.#opts.waitMs;
      this.#send(op);
    };
    ws.onmessage = (event) => {
      if (ws !== this.#ws) return;
      this.#lastFrameAt = Date.now();
      this.#heard = true;
      // One message holds one or more NDJSON frames; handle each in order.
      for (const line of String(event.data).split("\n")) {
        if (line.trim() && ws === this.#ws) this.#onFrame(JSON.parse(line));
      }
    };
    ws.onclose = (event) => { if (ws === this.#ws) this.#onClose(event.code, event.reason); };
  }

  /**
   * Every heartbeatMs: send a `ping` op; if nothing at all (chunk, pong, anything) arrived for
   * twice that, the connection is dead (half-open TCP: a sleeping laptop, a NAT entry dropped, a
   * host gone) though the browser still calls it open. Drop it without waiting for a close
   * handshake that will never complete, and resume from the cursor on a new one. The handshake
   * itself is covered too: a socket that never opens is given up the same way. `#heard` keeps
   * throttled timers (background tabs tick once a minute) from counting their own delay as silence.
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
        ws.close(); // its close event is ignored: this socket is no longer this.#ws
        return this.#retry(new RelaydError("timeout", "nothing received from relayd"));
      }
      this.#heard = false;
      this.#send({ op: "ping" });
    }, this.#heartbeatMs);
  }

  #send(op) {
    if (this.#ws && this.#ws.readyState === WebSocket.OPEN) this.#ws.send(JSON.stringify(op));
  }

  #onFrame(frame) {
    const id = this.#opts.streamId;
    if (frame.stream !== undefined && frame.stream !== id) return;
    switch (frame.type) {
      case "subscribed":
        // Not a reset of the backoff: relayd answers `subscribed` before its catch-up read, which
        // may still fail (store_unavailable while Redis is down). The first delivery resets it.
        this.#status = "live";
        this.#freshToken = false;
        for (let i = 0; i < this.#cancels.length; i++) this.#send({ op: "cancel", stream: id });
        break;
      case "chunk": {
        this.#attempt = 0; // relayd and its store work: the backoff starts over
        // Resuming never repeats a chunk; this check keeps that true whatever happens.
        if (this.#received && frame.cursor <= this.#received) return;
        this.#received = frame.cursor;
        let value;
        try {
          value = this.#opts.decoder ? this.#opts.decoder(frame.data) : frame.data;
        } catch (err) {
          return this.#fail(err);
        }
        this.#push({ value, cursor: frame.cursor });
        break;
      }
      case "end": {
        this.#attempt = 0;
        const end = { reason: frame.reason, cursor: frame.cursor };
        if (frame.message != null) end.message = frame.message;
        this.#status = "ended";
        for (const c of this.#cancels.splice(0)) c.resolve();
        this.#settleEnd.resolve(end);
        this.#push({ end });
        this.#finish(null, true);
        break;
      }
      case "cancel_requested":
        this.#cancels.shift()?.resolve();
        break;
      case "gap":
      case "reset": {
        const loss = frame.type === "gap"
          ? new RelaydError("gap", `chunks between ${frame.cursor} and ${frame.next} are gone`,
            { cursor: frame.cursor, next: frame.next })
          : new RelaydError("reset", `the stream was replaced (${frame.reason})`, { reason: frame.reason });
        if (!this.#opts.onLoss) return this.#fail(loss);
        this.#attempt = 0;
        const key = JSON.stringify([frame.type, frame.cursor, frame.next]);
        if (key === this.#lastLoss) break; // the same gap again after a reconnect: told once
        this.#lastLoss = key;
        // Accepted loss: delivery goes on (a reset restarts at the new generation's first chunk,
        // whose cursors need not sort after the old ones).
        if (frame.type === "reset") this.#received = null;
        this.#push({ loss });
        break;
      }
      case "error":
        this.#onError(frame);
        break;
      default: // pong, authed, unsubscribed, and frame types added later
    }
  }

  #onError(frame) {
    const err = new RelaydError(frame.code, frame.message);
    if (frame.stream === undefined) {
      console.warn("relayd:", frame.code, frame.message); // e.g. a refused `auth`: the close that follows is handled
    } else if (this.#cancels.length && CANCEL_REFUSALS.has(frame.code)) {
      this.#cancels.shift().reject(err);
    } else if (FATAL.has(frame.code)) {
      this.#fail(err);
    } else {
      this.#lastCause = err;
      this.#ws?.close(); // store_unavailable, internal, ...: resubscribe after a backoff
    }
  }

  #onClose(code, reason) {
    this.#ws = null;
    if (this.#done) return;
    if (code === 4003) return this.#fail(new RelaydError("forbidden", reason || "forbidden"));
    if (code === 4001 || code === 4002) {
      const what = code === 4001 ? "unauthorized" : "token_expired";
      // Without fetchToken, or when a token fetched just now is refused too, retrying cannot help.
      if (!this.#opts.fetchToken || this.#freshToken) {
        return this.#fail(new RelaydError(what, `relayd refused the token (${what})`));
      }
      this.#token = null; // fetch a fresh one before reconnecting
    }
    const cause = this.#lastCause || new RelaydError("closed", `the connection closed (${code} ${reason})`.trim());
    this.#lastCause = null;
    this.#retry(cause);
  }

  /**
   * Reconnect after an exponential, jittered delay, resuming after the last chunk received.
   * `#attempt` counts the reconnects since one last delivered something; past maxRetries the
   * subscription fails (with the error that caused the last one, if any) instead.
   */
  #retry(cause) {
    if (this.#done) return;
    clearInterval(this.#beatTimer);
    if (this.#attempt >= this.#maxRetries) {
      const why = cause ? `: ${cause.message || cause}` : "";
      return this.#fail(new RelaydError("retries_exhausted",
        `gave up after ${this.#attempt} reconnects in a row without a delivery${why}`, { cause }));
    }
    this.#status = "reconnecting";
    const { initialMs, maxMs } = this.#backoff;
    const ceiling = Math.min(maxMs, initialMs * 2 ** Math.min(this.#attempt++, 30), MAX_TIMER_MS);
    this.#retryTimer = setTimeout(() => this.#open(), ceiling / 2 + Math.random() * (ceiling / 2));
  }

  // tokens ----------------------------------------------------------------------------------

  async #refreshToken(sendAuth) {
    const token = await this.#opts.fetchToken();
    if (typeof token !== "string" || !token) throw new TypeError("fetchToken must return a JWT string");
    this.#token = token;
    if (sendAuth) this.#send({ op: "auth", token });
    this.#scheduleRefresh();
  }

  /** With fetchToken: replace the token on the open connection before it expires. */
  #scheduleRefresh() {
    clearTimeout(this.#refreshTimer);
    const claims = this.#token && this.#opts.fetchToken ? jwtClaims(this.#token) : null;
    if (this.#done || !claims || typeof claims.exp !== "number") return;
    // A third of the remaining lifetime before `exp`, at most a minute before (as the Python SDK);
    // never sooner than a second, so a skewed clock cannot make it spin.
    const remainingMs = claims.exp * 1000 - Date.now();
    const delay = Math.min(Math.max(remainingMs - Math.min(60_000, remainingMs / 3), 1000), MAX_TIMER_MS);
    this.#refreshTimer = setTimeout(() => {
      this.#refreshToken(true).then(() => { this.#refreshFailures = 0; }, (err) => {
        console.warn("relayd: token refresh failed; retrying", err);
        const { initialMs, maxMs } = this.#backoff;
        const wait = Math.min(maxMs, initialMs * 2 ** Math.min(this.#refreshFailures++, 30), MAX_TIMER_MS);
        this.#refreshTimer = setTimeout(() => this.#scheduleRefresh(), wait);
      });
    }, delay);
  }

  // iteration -------------------------------------------------------------------------------

  #push(item) {
    this.#queue.push(item);
    for (const wake of this.#wakers.splice(0)) wake();
  }

  /** A fatal error: the chunks already received are still handed out, then the iterator throws. */
  #fail(err) {
    this.#status = "closed";
    this.#queue.push({ error: err });
    this.#finish(err, true);
  }

  #finish(err, keepQueue) {
    if (this.#done) return;
    this.#done = true;
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#refreshTimer);
    clearInterval(this.#beatTimer);
    const ws = this.#ws;
    this.#ws = null;
    if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000);
    if (err) this.#settleEnd.reject(err);
    for (const c of this.#cancels.splice(0)) c.reject(err || new RelaydError("closed", "the subscription is over"));
    if (!keepQueue) this.#queue.length = 0;
    for (const wake of this.#wakers.splice(0)) wake();
  }
}

/** The claims of a JWT (not verified: only to know when to refresh), or null. */
function jwtClaims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4)));
  } catch {
    return null;
  }
}

/**
 * The text of one OpenAI-shaped chunk: a chat-completion chunk's `choices[0].delta.content`,
 * a legacy completion's `choices[0].text`, a Responses API `response.output_text.delta`, or a
 * plain string as is. "" when it carries no text (role-only, tool-call or usage chunks).
 * @param {any} chunk
 * @returns {string}
 */
export function openaiText(chunk) {
  if (typeof chunk === "string") return chunk;
  if (!chunk || typeof chunk !== "object") return "";
  const choice = Array.isArray(chunk.choices) ? chunk.choices[0] : undefined;
  const text = choice?.delta?.content ?? choice?.text ??
    (chunk.type === "response.output_text.delta" ? chunk.delta : undefined);
  return typeof text === "string" ? text : "";
}

/**
 * The text deltas of an iterable of OpenAI-shaped chunks (a Subscription, typically), skipping
 * chunks without text. Leaving the loop early closes the source.
 * @param {AsyncIterable<any>} source
 * @returns {AsyncGenerator<string>}
 */
export async function* textDeltas(source) {
  for await (const chunk of source) {
    const text = openaiText(chunk);
    if (text) yield text;
  }
}
