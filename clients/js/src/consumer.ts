/**
 * The consumer: follow relayd streams over one websocket (`/v1/ws`), in order, once each, across
 * drops, relayd restarts, token expiry and page reloads.
 *
 *     const sub = connect<MyChunk>({ url, streamId: "chat-42", fetchToken, persist: "session" });
 *     for await (const chunk of sub) render(chunk);
 *     const { reason } = await sub.ended;
 *
 * A {@link Connection} carries any number of subscriptions (`connection.subscribe(id)`);
 * {@link connect} is one subscription on a connection of its own, closed with it.
 *
 * Backpressure: frames that arrive while your loop is busy are buffered by the iterator
 * (relayd's flow control stops at the socket: browsers read websockets eagerly). A stream is
 * one model answer, so this is small; do not leave a subscription un-iterated.
 *
 * @module
 */
import { RelaydError } from "./errors.js";
import { allows, jwtClaims } from "./jwt.js";
import {
  BEARER_PROTOCOL, CLOSE_CODES, type EndReason, type Frame, PATHS, SUBPROTOCOL, parseMessage,
} from "./protocol.js";
import { OPEN, type WebSocketConstructor, type WebSocketLike, resolveWebSocket } from "./websocket.js";

/** Error codes after which retrying cannot help: the iterator throws, `ended` rejects. */
const FATAL = new Set([
  "stream_not_found", "forbidden", "unauthorized", "bad_frame", "invalid_stream_id", "too_many_streams", "unknown_op",
]);
/** Error codes that answer a refused `cancel` (the subscription goes on). */
const CANCEL_REFUSALS = new Set(["forbidden", "stream_ended"]);
/** setTimeout fires at once for delays above 2^31-1 ms (~24.8 days): longer waits are capped. */
const MAX_TIMER_MS = 2 ** 31 - 1;
/** How long an aborted subscription with `cancelOnAbort` waits for relayd to confirm the cancel. */
const CANCEL_LINGER_MS = 5000;

/** Where cursors are kept across reloads: sessionStorage, localStorage, or anything alike. */
export interface CursorStore {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
}

/** Options of a connection (shared by every stream on it). */
export interface ConnectionOptions {
  /** relayd's base URL, http(s):// or ws(s):// (a path prefix is kept); default: the page's origin */
  url?: string;
  /** a consumer JWT covering every stream followed on the connection */
  token?: string;
  /**
   * returns a fresh JWT: called when there is no token, when relayd refuses one (close
   * 4001/4002) and shortly before the current one expires
   */
  fetchToken?: () => string | Promise<string>;
  /** reconnect delays (default 250 ms .. 5 s), doubled per attempt, with jitter */
  backoff?: { initialMs?: number; maxMs?: number };
  /**
   * send a `ping` op this often (default 20 s; 0: never) and reconnect when nothing at all
   * arrived for twice that: browsers answer relayd's pings without telling the page, so only
   * this notices a connection that died silently
   */
  heartbeatMs?: number;
  /** give up after this many reconnects in a row that delivered nothing (default: Infinity) */
  maxRetries?: number;
  /** the WebSocket class (default: the global one, else the `ws` package's) */
  WebSocket?: WebSocketConstructor;
}

/** Options of one followed stream. */
export interface SubscribeOptions<Chunk = unknown> {
  /** resume after this cursor (default: from the start) */
  cursor?: string;
  /** keep the cursor across reloads under "relayd:cursor:<streamId>": "session" is sessionStorage */
  persist?: "session" | "local" | CursorStore;
  /** maps each chunk's `data` (already JSON-parsed; a string on text streams) to what you get */
  decoder?: (data: any) => Chunk;
  /** aborting closes the subscription */
  signal?: AbortSignal;
  /**
   * with `signal`: aborting also asks the producer to stop (a `cancel` op), when the token has
   * the `cancel` right for the stream (the OpenAI convention: abort stops the generation)
   */
  cancelOnAbort?: boolean;
  /** how long relayd waits for a stream that does not exist yet */
  waitMs?: number;
  /**
   * accept lost history and read on: called, in order, with a "gap" (trimmed/expired chunks)
   * or "reset" (stream replaced) error. Without it, a loss ends the subscription.
   */
  onLoss?: (loss: RelaydError) => void;
}

export interface ConnectOptions<Chunk = unknown> extends ConnectionOptions, SubscribeOptions<Chunk> {
  /** the stream to follow */
  streamId: string;
}

/** How a stream ended. */
export interface End {
  reason: EndReason;
  message?: string;
  cursor: string;
}

export type ConnectionStatus = "idle" | "connecting" | "open" | "reconnecting" | "closed";
export type SubscriptionStatus = "connecting" | "live" | "reconnecting" | "ended" | "closed";

/** Follow one stream on a connection of its own. Returns at once; the socket opens in the background. */
export function connect<Chunk = unknown>(options: ConnectOptions<Chunk>): Subscription<Chunk> {
  if (!options || !options.streamId) throw new TypeError("connect: streamId is required");
  const connection = new Connection(options, true);
  return connection.subscribe<Chunk>(options.streamId, options);
}

/** A connection to follow several streams over one websocket. */
export function openConnection(options: ConnectionOptions = {}): Connection {
  return new Connection(options, false);
}

type Resolvers = { resolve: () => void; reject: (err: unknown) => void };

/**
 * One websocket to relayd's `/v1/ws`, carrying the subscriptions made with {@link subscribe}.
 * It connects on the first subscription, reconnects with backoff after any drop (resubscribing
 * every stream from its cursor), keeps its token fresh and checks liveness with a heartbeat.
 */
export class Connection {
  readonly #opts: ConnectionOptions;
  readonly #owned: boolean; // made by connect(): closed with its only subscription
  readonly #wsUrl: string;
  readonly #backoff: { initialMs: number; maxMs: number };
  readonly #heartbeatMs: number;
  readonly #maxRetries: number;
  readonly #subs = new Map<string, Subscription<any>>();
  #ws: WebSocketLike | null = null;
  #status: ConnectionStatus = "idle";
  #attempt = 0;
  #token: string | null;
  #freshToken = false; // fetched for this connection and not yet accepted by relayd
  #lastCause: RelaydError | null = null; // the error frame that made us drop the connection
  #retryTimer: ReturnType<typeof setTimeout> | undefined;
  #refreshTimer: ReturnType<typeof setTimeout> | undefined;
  #beatTimer: ReturnType<typeof setInterval> | undefined;
  #refreshFailures = 0;
  #lastFrameAt = 0;
  #heard = false; // any frame since the last ping

  constructor(opts: ConnectionOptions, owned = false) {
    this.#opts = opts;
    this.#owned = owned;
    const origin = (globalThis as { location?: { origin?: string } }).location?.origin;
    const raw = opts.url || origin;
    if (!raw) throw new TypeError("relayd: `url` is required outside a browser page");
    const base = new URL(raw);
    base.protocol = base.protocol.replace(/^http/, "ws");
    this.#wsUrl = base.origin + base.pathname.replace(/\/+$/, "") + PATHS.consume;
    this.#backoff = { initialMs: 250, maxMs: 5000, ...opts.backoff };
    this.#heartbeatMs = Math.min(opts.heartbeatMs ?? 20_000, MAX_TIMER_MS);
    this.#maxRetries = opts.maxRetries ?? Infinity;
    this.#token = opts.token || null;
  }

  get status(): ConnectionStatus {
    return this.#status;
  }

  /** Follow `streamId` on this connection (the token must cover it). */
  subscribe<Chunk = unknown>(streamId: string, options: SubscribeOptions<Chunk> = {}): Subscription<Chunk> {
    if (!streamId) throw new TypeError("subscribe: streamId is required");
    if (this.#status === "closed") throw new RelaydError("closed", "the connection is closed");
    if (this.#subs.has(streamId)) throw new RelaydError("bad_frame", `already following ${streamId} on this connection`);
    const sub = new Subscription<Chunk>(this, streamId, options);
    if (sub.status === "closed") return sub; // aborted before it started
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
  close(): void {
    if (this.#status === "closed") return;
    for (const sub of [...this.#subs.values()]) sub.close();
    this.#shutdown();
  }

  // used by Subscription -------------------------------------------------------------------

  /** @internal */
  _send(op: Record<string, unknown>): boolean {
    const ws = this.#ws;
    if (!ws || ws.readyState !== OPEN) return false;
    ws.send(JSON.stringify(op));
    return true;
  }

  /** @internal a delivery: relayd and its store work, the backoff starts over */
  _progress(): void {
    this.#attempt = 0;
  }

  /** @internal whether the current token (as far as it can be read) lets us cancel `stream` */
  _mayCancel(stream: string): boolean {
    const claims = this.#token ? jwtClaims(this.#token) : null;
    return claims === null || allows(claims, stream, "cancel");
  }

  /** @internal a transient error on one stream: drop the socket, resubscribe everything after a backoff */
  _drop(cause: RelaydError): void {
    this.#lastCause = cause;
    this.#ws?.close();
  }

  /** @internal the subscription is over: stop routing frames to it */
  _remove(sub: Subscription<any>, unsubscribe: boolean): void {
    if (this.#subs.get(sub.streamId) !== sub) return;
    this.#subs.delete(sub.streamId);
    if (unsubscribe) this._send({ op: "unsubscribe", stream: sub.streamId });
    if (this.#owned && this.#subs.size === 0) this.#shutdown();
  }

  // the socket -----------------------------------------------------------------------------

  #subscriptions(): Subscription<any>[] {
    return [...this.#subs.values()];
  }

  async #open(): Promise<void> {
    if (this.#status === "closed") return;
    let WS: WebSocketConstructor;
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
    if ((this.#status as ConnectionStatus) === "closed") return; // closed while fetching the token
    const protocols = this.#token ? [SUBPROTOCOL, BEARER_PROTOCOL + this.#token] : [SUBPROTOCOL];
    let ws: WebSocketLike;
    try {
      ws = new WS(this.#wsUrl, protocols);
    } catch (err) {
      // a malformed URL or token: retrying cannot help
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
      // One message holds one or more NDJSON frames; handle each in order.
      for (const frame of parseMessage(event.data)) {
        if (ws === this.#ws) this.#onFrame(frame);
      }
    };
    ws.onerror = () => {}; // the close event that follows is what counts
    ws.onclose = (event) => {
      if (ws === this.#ws) this.#onClose(event.code, event.reason);
    };
  }

  #onFrame(frame: Frame): void {
    if (frame.stream !== undefined) {
      this.#subs.get(frame.stream)?._onFrame(frame);
      if (frame.type === "subscribed") this.#freshToken = false;
      return;
    }
    if (frame.type === "error") {
      console.warn("relayd:", frame.code, frame.message); // e.g. a refused `auth`: the close that follows is handled
    } else if (frame.type === "authed") {
      this.#freshToken = false;
    }
    // pong, and frame types added later
  }

  #onClose(code: number, reason: string): void {
    this.#ws = null;
    if (this.#status === "closed") return;
    if (code === CLOSE_CODES.FORBIDDEN) return this.#failAll(new RelaydError("forbidden", reason || "forbidden"));
    if (code === CLOSE_CODES.UNAUTHORIZED || code === CLOSE_CODES.TOKEN_EXPIRED) {
      const what = code === CLOSE_CODES.UNAUTHORIZED ? "unauthorized" : "token_expired";
      // Without fetchToken, or when a token fetched just now is refused too, retrying cannot help.
      if (!this.#opts.fetchToken || this.#freshToken) {
        return this.#failAll(new RelaydError(what, `relayd refused the token (${what})`));
      }
      this.#token = null; // fetch a fresh one before reconnecting
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
  #retry(cause: RelaydError): void {
    if (this.#status === "closed") return;
    clearInterval(this.#beatTimer);
    if (this.#attempt >= this.#maxRetries) {
      return this.#failAll(new RelaydError("retries_exhausted",
        `gave up after ${this.#attempt} reconnects in a row without a delivery: ${cause.message}`, { cause }));
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
  #startHeartbeat(ws: WebSocketLike): void {
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
      this._send({ op: "ping" });
    }, this.#heartbeatMs);
  }

  // tokens ---------------------------------------------------------------------------------

  async #refreshToken(sendAuth: boolean): Promise<void> {
    const token = await this.#opts.fetchToken!();
    if (typeof token !== "string" || !token) throw new TypeError("fetchToken must return a JWT string");
    this.#token = token;
    if (sendAuth) this._send({ op: "auth", token });
    this.#scheduleRefresh();
  }

  /** With fetchToken: replace the token on the open connection before it expires. */
  #scheduleRefresh(): void {
    clearTimeout(this.#refreshTimer);
    const claims = this.#token && this.#opts.fetchToken ? jwtClaims(this.#token) : null;
    if (this.#status === "closed" || !claims || typeof claims.exp !== "number") return;
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

  // the end --------------------------------------------------------------------------------

  #failAll(err: RelaydError): void {
    for (const sub of this.#subscriptions()) sub._fail(err);
    this.#shutdown();
  }

  #shutdown(): void {
    if (this.#status === "closed") return;
    this.#status = "closed";
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#refreshTimer);
    clearInterval(this.#beatTimer);
    const ws = this.#ws;
    this.#ws = null;
    if (ws && ws.readyState <= OPEN) ws.close(1000);
  }
}

type Item<Chunk> =
  | { value: Chunk; cursor: string }
  | { end: End }
  | { loss: RelaydError }
  | { error: unknown };

/**
 * One followed stream: an async iterable of its decoded chunks (single consumer), plus
 * `cursor`, `status`, `ended`, `cancel()` and `close()`.
 */
export class Subscription<Chunk = unknown> implements AsyncIterableIterator<Chunk> {
  readonly streamId: string;
  /** Settles once: resolves with the End relayd reported, rejects with the error that ended it. */
  readonly ended: Promise<End>;
  readonly #conn: Connection;
  readonly #opts: SubscribeOptions<Chunk>;
  readonly #store: CursorStore | null;
  readonly #storageKey: string;
  #status: SubscriptionStatus = "connecting";
  #received: string | null; // cursor of the last chunk received from relayd
  #cursor: string | null; // cursor of the last chunk handed to the loop
  #queue: Item<Chunk>[] = [];
  #wakers: (() => void)[] = [];
  #done = false; // the iteration is over (more items may wait in the queue)
  #lastLoss: string | null = null;
  #cancels: Resolvers[] = [];
  #lingering: Resolvers | null = null; // aborted with cancelOnAbort: waits for relayd to confirm
  #settleEnd!: { resolve: (end: End) => void; reject: (err: unknown) => void };

  /** @internal use `connect()` or `connection.subscribe()` */
  constructor(conn: Connection, streamId: string, opts: SubscribeOptions<Chunk>) {
    this.#conn = conn;
    this.streamId = streamId;
    this.#opts = opts;
    this.#store = cursorStore(opts.persist);
    this.#storageKey = `relayd:cursor:${streamId}`;
    const stored = this.#store?.getItem(this.#storageKey) ?? null;
    // Cursors of one stream sort in append order: start after the later of the two.
    this.#cursor = [opts.cursor, stored].filter((c): c is string => !!c).sort().pop() ?? null;
    this.#received = this.#cursor;
    this.ended = new Promise<End>((resolve, reject) => { this.#settleEnd = { resolve, reject }; });
    this.ended.catch(() => {}); // not awaiting `ended` is fine: no unhandled-rejection noise
    const signal = opts.signal;
    if (signal?.aborted) {
      this.#status = "closed";
      this.#finish(new RelaydError("closed", "closed by the client"), false);
      return;
    }
    signal?.addEventListener("abort", () => this.#onAbort(), { once: true });
  }

  /** Cursor of the last chunk handed to your loop (or of the end once the loop reached it). */
  get cursor(): string | null {
    return this.#cursor;
  }

  get status(): SubscriptionStatus {
    return this.#status;
  }

  [Symbol.asyncIterator](): this {
    return this;
  }

  async next(): Promise<IteratorResult<Chunk, undefined>> {
    for (;;) {
      if (!this.#queue.length && !this.#done) await new Promise<void>((wake) => this.#wakers.push(wake));
      const item = this.#queue.shift();
      if (!item) return { done: true, value: undefined };
      if ("error" in item) throw item.error;
      if ("loss" in item) {
        this.#opts.onLoss!(item.loss); // in order: after the chunks before the loss were handled
        continue;
      }
      this.#cursor = "end" in item ? item.end.cursor || this.#cursor : item.cursor;
      // Stored as the chunk is handed over: render it synchronously in your loop and a reload
      // resumes exactly after it. After the end the end's cursor stays, so a reload gets `end` only.
      if (this.#store && this.#cursor) this.#store.setItem(this.#storageKey, this.#cursor);
      return "end" in item ? { done: true, value: undefined } : { done: false, value: item.value };
    }
  }

  /** Leaving a `for await` loop early (break, throw) closes the subscription. */
  async return(): Promise<IteratorResult<Chunk, undefined>> {
    this.close();
    return { done: true, value: undefined };
  }

  /**
   * Ask the producer to stop (the token needs the "cancel" right). Resolves when relayd
   * accepted the request; the stream then ends with reason "cancelled".
   */
  cancel(): Promise<void> {
    if (this.#done) return Promise.reject(new RelaydError("closed", "the subscription is over"));
    return new Promise<void>((resolve, reject) => {
      this.#cancels.push({ resolve, reject });
      if (this.#status === "live") this.#conn._send({ op: "cancel", stream: this.streamId });
    });
  }

  /** Stop following: ends the iteration; `ended` rejects with "closed" if it had not ended. */
  close(): void {
    if (this.#lingering) return; // aborted with cancelOnAbort: leaves once relayd answered the cancel
    if (this.#status !== "ended") this.#status = "closed";
    this.#finish(new RelaydError("closed", "closed by the client"), false);
    this.#conn._remove(this, true);
  }

  // driven by the connection ---------------------------------------------------------------

  /** @internal */
  _onSocketOpen(): void {
    if (this.#lingering) {
      this.#conn._send({ op: "cancel", stream: this.streamId });
      return;
    }
    const op: Record<string, unknown> = { op: "subscribe", stream: this.streamId };
    if (this.#received) op.cursor = this.#received;
    if (this.#opts.waitMs != null) op.wait_ms = this.#opts.waitMs;
    this.#conn._send(op);
  }

  /** @internal */
  _onSocketLost(): void {
    if (!this.#done) this.#status = "reconnecting";
  }

  /** @internal a fatal error: the chunks already received are still handed out, then the iterator throws */
  _fail(err: unknown): void {
    if (this.#lingering) return this.#stopLingering();
    if (this.#done) return;
    this.#status = "closed";
    this.#queue.push({ error: err });
    this.#finish(err, true);
    this.#conn._remove(this, false);
  }

  /** @internal */
  _onFrame(frame: Frame): void {
    if (this.#lingering) return this.#onLingeringFrame(frame);
    if (this.#done) return;
    const conn = this.#conn;
    switch (frame.type) {
      case "subscribed":
        // Not a reset of the backoff: relayd answers `subscribed` before its catch-up read, which
        // may still fail (store_unavailable while Redis is down). The first delivery resets it.
        this.#status = "live";
        for (let i = 0; i < this.#cancels.length; i++) conn._send({ op: "cancel", stream: this.streamId });
        break;
      case "chunk": {
        conn._progress();
        const cursor = frame.cursor as string;
        // Resuming never repeats a chunk; this check keeps that true whatever happens.
        if (this.#received && cursor <= this.#received) return;
        this.#received = cursor;
        let value: Chunk;
        try {
          value = this.#opts.decoder ? this.#opts.decoder(frame.data) : (frame.data as Chunk);
        } catch (err) {
          return this._fail(err);
        }
        this.#push({ value, cursor });
        break;
      }
      case "end": {
        conn._progress();
        const end: End = { reason: frame.reason as EndReason, cursor: frame.cursor as string };
        if (frame.message != null) end.message = frame.message as string;
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
      default: // unsubscribed, and frame types added later
    }
  }

  #onLoss(frame: Frame): void {
    const loss = frame.type === "gap"
      ? new RelaydError("gap", `chunks between ${frame.cursor} and ${frame.next} are gone`,
        { cursor: frame.cursor, next: frame.next, stream: this.streamId })
      : new RelaydError("reset", `the stream was replaced (${frame.reason})`,
        { reason: frame.reason, stream: this.streamId });
    if (!this.#opts.onLoss) return this._fail(loss);
    this.#conn._progress();
    const key = JSON.stringify([frame.type, frame.cursor, frame.next]);
    if (key === this.#lastLoss) return; // the same gap again after a reconnect: told once
    this.#lastLoss = key;
    // Accepted loss: delivery goes on (a reset restarts at the new generation's first chunk,
    // whose cursors need not sort after the old ones).
    if (frame.type === "reset") this.#received = null;
    this.#push({ loss });
  }

  #onError(frame: Frame): void {
    const code = String(frame.code);
    const err = new RelaydError(code, frame.message as string | undefined, { stream: this.streamId });
    if (this.#cancels.length && CANCEL_REFUSALS.has(code)) {
      this.#cancels.shift()!.reject(err);
    } else if (FATAL.has(code)) {
      this._fail(err);
    } else {
      this.#conn._drop(err); // store_unavailable, internal, ...: resubscribe after a backoff
    }
  }

  // abort ----------------------------------------------------------------------------------

  #onAbort(): void {
    if (this.#done) return;
    if (!this.#opts.cancelOnAbort || !this.#conn._mayCancel(this.streamId)) return this.close();
    // The iteration ends now; the subscription stays on the connection until relayd confirmed
    // the cancel (or refused it, or the stream ended), at most CANCEL_LINGER_MS.
    this.#status = "closed";
    this.#finish(new RelaydError("closed", "aborted: the stream was asked to cancel"), false);
    const timer = setTimeout(() => this.#stopLingering(), CANCEL_LINGER_MS);
    this.#lingering = { resolve: () => clearTimeout(timer), reject: () => clearTimeout(timer) };
    this.#conn._send({ op: "cancel", stream: this.streamId }); // not connected yet: sent on open
  }

  #onLingeringFrame(frame: Frame): void {
    if (frame.type === "cancel_requested" || frame.type === "end" || frame.type === "error") this.#stopLingering();
  }

  #stopLingering(): void {
    const lingering = this.#lingering;
    if (!lingering) return;
    this.#lingering = null;
    lingering.resolve();
    this.#conn._remove(this, true);
  }

  // iteration ------------------------------------------------------------------------------

  #push(item: Item<Chunk>): void {
    this.#queue.push(item);
    for (const wake of this.#wakers.splice(0)) wake();
  }

  #finish(err: unknown, keepQueue: boolean): void {
    if (this.#done) return;
    this.#done = true;
    if (err) this.#settleEnd.reject(err);
    const why = err || new RelaydError("closed", "the subscription is over");
    for (const c of this.#cancels.splice(0)) c.reject(why);
    if (!keepQueue) this.#queue.length = 0;
    for (const wake of this.#wakers.splice(0)) wake();
  }
}

function cursorStore(persist: SubscribeOptions["persist"]): CursorStore | null {
  if (!persist) return null;
  if (typeof persist === "object") return persist;
  const storage = (globalThis as Record<string, unknown>)[persist === "local" ? "localStorage" : "sessionStorage"];
  if (!storage) throw new TypeError(`relayd: persist "${persist}" needs ${persist}Storage: pass a CursorStore instead`);
  return storage as CursorStore;
}
