/**
 * The producer (Node, Deno, Bun, any runtime whose WebSocket can send an `Authorization`
 * header): push streams into relayd over one websocket to `/v1/ingest`, as the Python
 * `relayd.client.Producer` does (docs/clients.md, "TypeScript producer").
 *
 *     const producer = new Producer({ url: "http://127.0.0.1:8080", apiKey });
 *     await producer.stream("chat-42", (signal) => modelStream({ signal }));
 *     await producer.close();
 *
 * - **Batching**: ops are not written when queued: once per event-loop turn, everything queued
 *   meanwhile goes as one NDJSON message, one `append` (with `chunks`) per stream.
 * - **Ack window**: the bytes of unacknowledged chunk JSON, all streams together, stay under
 *   `maxUnackedBytes` (one oversized chunk excepted): `send()` waits for room. Chunks are kept
 *   until acknowledged, so they can be resent.
 * - **Reconnect and resend**: after a drop, each stream is re-opened with the epoch it holds
 *   (before its first `opened`: with no epoch and the same random producer id, which relayd
 *   resumes instead of taking over); its appends wait for `opened`, whose `seq` says what relayd
 *   stored, and what follows is resent. `store_unavailable`, `seq_gap` and `not_open` refusals
 *   resynchronise a stream the same way. Nothing is lost, nothing is stored twice.
 * - **Cancel**: a consumer's cancel aborts the writer's `signal` (hand it to the model call)
 *   and stops `stream()`, which ends the stream `cancelled`.
 *
 * @module
 */
import { RelaydError } from "./errors.js";
import { type Encoder, defaultEncoder } from "./encoders.js";
import {
  CLOSE_CODES, type ContentType, type EndReason, type Frame, MAX_END_MESSAGE, PATHS, type ProducerEndReason,
  isValidStreamId, parseMessage,
} from "./protocol.js";
import { OPEN, type WebSocketConstructor, type WebSocketLike, nodeWebSocket } from "./websocket.js";

export { mintToken, type MintOptions } from "./tokens.js";
export { defaultEncoder, jsonEncoder, textEncoder, type Encoder } from "./encoders.js";
export { RelaydError } from "./errors.js";

const TERMINAL_CODES = new Set(["fenced", "stream_ended"]);
const RESYNC_CODES = new Set(["store_unavailable", "seq_gap", "not_open"]);
const MIN_MESSAGE_BYTES = 4096; // how far a 1009 close may lower the message size
const APPEND_OVERHEAD = 64; // bytes an append frame adds around its chunks besides the stream id

export interface ProducerOptions {
  /** relayd's base URL, http(s):// or ws(s):// */
  url: string;
  /** one of relayd's API keys */
  apiKey: string;
  /** default content type of new streams (default "json") */
  contentType?: ContentType;
  /** default encoder (default: jsonEncoder for json streams, textEncoder for text streams) */
  encoder?: Encoder;
  /** bytes of chunk JSON sent and not acknowledged, all streams together (default 1 MiB) */
  maxUnackedBytes?: number;
  /** the largest websocket message written (default 512 KiB; below relayd's limits.max_frame_bytes) */
  maxMessageBytes?: number;
  /** reconnect after a drop (default true) */
  reconnect?: boolean;
  /** reconnect delays (default 100 ms .. 5 s), doubled per attempt, with jitter */
  backoff?: { initialMs?: number; maxMs?: number };
  /** give up (code "connection_failed") once an outage has lasted this long (default 60 s) */
  reconnectTimeoutMs?: number;
  /** how long close() waits for acks and ends (default 10 s) */
  closeTimeoutMs?: number;
  /** send a `ping` op this often and reconnect when nothing arrived for twice that (default 20 s; 0: never) */
  heartbeatMs?: number;
  /** the WebSocket class; default: the `ws` package's, else the global one (Deno, Bun) */
  WebSocket?: WebSocketConstructor;
}

export interface WriterOptions {
  contentType?: ContentType;
  encoder?: Encoder;
  /** called when a consumer asks to cancel (or relayd ends the stream unasked) */
  onCancel?: () => void;
}

/** How a stream ended, as relayd stored it. */
export interface StreamResult {
  stream: string;
  reason: EndReason;
  cursor: string | null;
  /** chunks this producer appended */
  chunks: number;
  /** the upstream's error, when stream() was told not to throw it */
  error?: unknown;
  /** relayd ended the stream unasked (an operator): why */
  endedByServer?: RelaydError;
}

/**
 * What `stream()` reads: an async iterable, a ReadableStream, a sync iterable, or a function
 * that takes the writer's AbortSignal (aborted on a consumer's cancel) and returns one of those
 * (or a promise of one): pass that signal to the model call so a cancel stops the generation.
 */
export type Source<T> =
  | AsyncIterable<T>
  | Iterable<T>
  | ReadableStream<T>
  | ((signal: AbortSignal) => AsyncIterable<T> | Iterable<T> | ReadableStream<T> | PromiseLike<AsyncIterable<T> | Iterable<T> | ReadableStream<T>>);

export interface StreamOptions extends WriterOptions {
  /** return the upstream's error in the result instead of throwing it (the stream ends "error" either way) */
  raiseOnError?: boolean;
  /** a last chunk appended when a consumer cancels, before the end (the AI SDK's `{type: "abort"}`) */
  cancelChunk?: unknown;
}

type Waiter = { resolve: () => void; reject: (err: unknown) => void };

/** A connection to relayd's producer websocket, carrying any number of streams. */
export class Producer {
  readonly url: string;
  readonly #opts: Required<Omit<ProducerOptions, "encoder" | "WebSocket" | "backoff">> & Pick<ProducerOptions, "encoder" | "WebSocket">;
  readonly #backoff: { initialMs: number; maxMs: number };
  readonly #streams = new Map<string, StreamWriter>();
  #dirty = new Set<StreamWriter>();
  #ws: WebSocketLike | null = null;
  #connecting: Promise<void> | null = null;
  #flushScheduled = false;
  #unacked = 0;
  #roomWaiters: Waiter[] = [];
  #settleWaiters: Waiter[] = [];
  #failure: RelaydError | null = null;
  #closed = false;
  #messageLimit: number;
  #outageStart: number | null = null;
  #attempt = 0;
  #retryTimer: ReturnType<typeof setTimeout> | undefined;
  #beatTimer: ReturnType<typeof setInterval> | undefined;
  #lastFrameAt = 0;
  #heard = false;
  #connectedAt = 0;
  /** websocket messages written (a measure of batching) */
  messagesSent = 0;

  constructor(options: ProducerOptions) {
    if (!options?.url || !options.apiKey) throw new TypeError("Producer: url and apiKey are required");
    this.#opts = {
      contentType: "json",
      maxUnackedBytes: 1 << 20,
      maxMessageBytes: 512 * 1024,
      reconnect: true,
      reconnectTimeoutMs: 60_000,
      closeTimeoutMs: 10_000,
      heartbeatMs: 20_000,
      ...options,
    };
    if (!(this.#opts.maxUnackedBytes > 0) || !(this.#opts.maxMessageBytes > 0)) {
      throw new TypeError("maxUnackedBytes and maxMessageBytes must be positive");
    }
    this.#backoff = { initialMs: 100, maxMs: 5000, ...options.backoff };
    this.#messageLimit = this.#opts.maxMessageBytes;
    const base = new URL(options.url);
    base.protocol = base.protocol.replace(/^http/, "ws");
    this.url = base.origin + base.pathname.replace(/\/+$/, "") + PATHS.ingest;
  }

  /** Bytes of chunk JSON sent (or queued) and not yet acknowledged. */
  get unackedBytes(): number {
    return this.#unacked;
  }

  /**
   * Open the websocket (writer() and stream() do it too). Rejects with code "unauthorized" for
   * a bad key, "connection_failed" when relayd cannot be reached within reconnectTimeoutMs.
   */
  connect(): Promise<void> {
    this.#check();
    this.#connecting ??= this.#connectLoop().catch((err) => {
      this.#failAll(err instanceof RelaydError ? err : new RelaydError("connection_failed", String(err)));
      throw this.#failure;
    });
    return this.#connecting;
  }

  /** Open `streamId` (taking it over if it exists and is open) and return its writer. */
  writer(streamId: string, options: WriterOptions = {}): StreamWriter {
    this.#check();
    if (!isValidStreamId(streamId)) throw new TypeError(`invalid stream id ${JSON.stringify(streamId)}`);
    if (this.#streams.has(streamId)) throw new TypeError(`stream ${streamId} is already being written by this Producer`);
    const contentType = options.contentType ?? this.#opts.contentType;
    if (contentType !== "json" && contentType !== "text") throw new TypeError(`contentType must be "json" or "text"`);
    const encoder = options.encoder ?? (options.contentType ? undefined : this.#opts.encoder) ?? defaultEncoder(contentType);
    const writer = new StreamWriter(this, streamId, contentType, encoder);
    if (options.onCancel) writer.onCancel(options.onCancel);
    this.#streams.set(streamId, writer);
    void this.connect().catch(() => {}); // failures reach the writer through #failAll
    this._markDirty(writer);
    return writer;
  }

  /**
   * Append every item of `source` to `streamId`, then end the stream:
   * - `source` ends: "completed";
   * - `source` throws: "error" with its message, then the error is thrown again (the stream is
   *   already ended when you see it), or returned in `result.error` with `raiseOnError: false`;
   * - a consumer cancels: the signal handed to a source function aborts, iteration stops at
   *   once, the source is closed (`return()` / `cancel()`), the stream ends "cancelled";
   * - relayd ends the stream (an operator): the same, `result.endedByServer` says why;
   * - relayd refuses the stream (fenced, already ended) or the connection gives up: the source
   *   is closed and that RelaydError is thrown.
   */
  async stream<T>(streamId: string, source: Source<T>, options: StreamOptions = {}): Promise<StreamResult> {
    const writer = this.writer(streamId, options);
    return writer.pipe(source, options.raiseOnError ?? true, options.cancelChunk);
  }

  /** Wait until every chunk sent so far, on every stream, is acknowledged. */
  async flush(): Promise<void> {
    await this.#settled(Infinity);
    this.#check();
  }

  /**
   * Wait (at most closeTimeoutMs) for acks and ends, then close the websocket. Rejects with
   * code "ack_timeout" if chunks were still unacknowledged, or with the connection's failure.
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    const settled = await this.#settled(this.#opts.closeTimeoutMs);
    const unacked = [...this.#streams.values()].reduce((n, w) => n + w._unackedCount, 0);
    const failure = this.#failure;
    this.#closed = true;
    this.#failAll(new RelaydError("closed", "the Producer is closed"));
    if (failure) throw failure;
    if (!settled) throw new RelaydError("ack_timeout", `${unacked} chunks not acknowledged within ${this.#opts.closeTimeoutMs} ms`);
  }

  // used by StreamWriter ---------------------------------------------------------------------

  /** @internal */
  get _messageLimit(): number {
    return this.#messageLimit;
  }

  /** @internal */
  _check(): void {
    this.#check();
  }

  /** @internal wait for `nbytes` of room in the ack window, then take it */
  async _reserve(nbytes: number): Promise<void> {
    while (this.#unacked && this.#unacked + nbytes > this.#opts.maxUnackedBytes) {
      this.#check();
      await new Promise<void>((resolve, reject) => this.#roomWaiters.push({ resolve, reject }));
    }
    this.#check();
    this.#unacked += nbytes;
  }

  /** @internal */
  _release(nbytes: number): void {
    if (!nbytes) return;
    this.#unacked -= nbytes;
    for (const w of this.#roomWaiters.splice(0)) w.resolve();
    this.#wakeSettled();
  }

  /** @internal */
  _markDirty(writer: StreamWriter, delayMs = 0): void {
    if (delayMs > 0) {
      setTimeout(() => this._markDirty(writer), delayMs);
      return;
    }
    this.#dirty.add(writer);
    if (!this.#flushScheduled) {
      this.#flushScheduled = true;
      setTimeout(() => this.#flush(), 0); // a macrotask: everything sent in this turn goes in one message
    }
  }

  /** @internal */
  _forget(writer: StreamWriter): void {
    if (this.#streams.get(writer.stream) === writer) this.#streams.delete(writer.stream);
    this.#dirty.delete(writer);
    this.#wakeSettled();
  }

  /** @internal */
  get _backoffInitialMs(): number {
    return this.#backoff.initialMs;
  }

  // the connection ---------------------------------------------------------------------------

  #check(): void {
    if (this.#failure) throw this.#failure;
    if (this.#closed) throw new RelaydError("closed", "the Producer is closed");
  }

  async #connectLoop(): Promise<void> {
    const WS = this.#opts.WebSocket ?? (await nodeWebSocket());
    const Global = (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    const headers = { Authorization: `Bearer ${this.#opts.apiKey}` };
    for (;;) {
      if (this.#closed) return;
      this.#outageStart ??= Date.now();
      let error: unknown;
      try {
        const ws = WS
          ? new WS(this.url, [], { headers })
          : Global
            ? new (Global as any)(this.url, { headers }) // Deno, Bun: headers in the second argument
            : null;
        if (!ws) throw new RelaydError("connection_failed", "no WebSocket in this runtime: install the `ws` package");
        await this.#opened(ws);
        this.#attach(ws);
        return;
      } catch (err) {
        if (err instanceof RelaydError && (err.code === "unauthorized" || err.code === "forbidden")) throw err;
        error = err;
      }
      if (!this.#opts.reconnect) throw new RelaydError("connection_failed", `cannot connect to ${this.url}: ${error}`, { cause: error });
      if (Date.now() - this.#outageStart >= this.#opts.reconnectTimeoutMs) {
        throw new RelaydError("connection_failed", `relayd unreachable for ${this.#opts.reconnectTimeoutMs} ms: ${error}`, { cause: error });
      }
      await new Promise<void>((resolve) => { this.#retryTimer = setTimeout(resolve, this.#delay()); });
    }
  }

  #delay(): number {
    const { initialMs, maxMs } = this.#backoff;
    const ceiling = Math.min(maxMs, initialMs * 2 ** Math.min(this.#attempt++, 30));
    return ceiling / 2 + Math.random() * (ceiling / 2);
  }

  /** Resolves when `ws` opened; rejects with "unauthorized" for an HTTP 401 (from `ws`'s error message). */
  #opened(ws: WebSocketLike): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      let failed: unknown = null;
      ws.onopen = () => resolve();
      ws.onerror = (event: any) => { failed = event?.error ?? event?.message ?? event; };
      ws.onclose = (event) => {
        const status = /server response: (\d{3})/.exec(String((failed as Error)?.message ?? failed))?.[1];
        if (status === "401") reject(new RelaydError("unauthorized", "relayd refused the API key"));
        else if (status === "403") reject(new RelaydError("forbidden", "relayd refused the API key for these streams"));
        else reject(new RelaydError("closed", `connection failed (${event.code} ${failed ?? ""})`.trim(), { cause: failed }));
      };
    });
  }

  #attach(ws: WebSocketLike): void {
    this.#ws = ws;
    this.#connectedAt = Date.now();
    ws.onerror = () => {};
    ws.onmessage = (event) => {
      if (ws !== this.#ws) return;
      this.#lastFrameAt = Date.now();
      this.#heard = true;
      for (const frame of parseMessage(event.data)) this.#dispatch(frame);
    };
    ws.onclose = (event) => {
      if (ws === this.#ws) this.#onClose(event.code);
    };
    this.#startHeartbeat(ws);
    for (const writer of this.#streams.values()) this.#dirty.add(writer);
    this.#flush();
  }

  #onClose(code: number): void {
    this.#ws = null;
    clearInterval(this.#beatTimer);
    if (this.#closed || this.#failure) return;
    if (!this.#opts.reconnect) {
      return this.#failAll(new RelaydError("connection_failed", `connection to ${this.url} lost (code ${code}); reconnect is off`));
    }
    if (code === CLOSE_CODES.MESSAGE_TOO_BIG) this.#shrinkMessages();
    // The outage ends with progress (an ack, an ended), not a handshake: a connection relayd drops
    // right after each resend is one outage. Only a quiet connection that lived a while starts anew.
    if (!this.#outstanding() && Date.now() - this.#connectedAt >= Math.max(this.#backoff.maxMs, 1000)) {
      this.#outageStart = null;
      this.#attempt = 0;
    }
    for (const writer of this.#streams.values()) writer._disconnected();
    this.#connecting = new Promise<void>((resolve) => {
      this.#retryTimer = setTimeout(resolve, this.#delay());
    }).then(() => this.#connectLoop()).catch((err) => {
      this.#failAll(err instanceof RelaydError ? err : new RelaydError("connection_failed", String(err)));
    });
  }

  /** relayd closed 1009: a message exceeded its limits.max_frame_bytes. Halve the message size. */
  #shrinkMessages(): void {
    this.#messageLimit = Math.max(Math.floor(this.#messageLimit / 2), MIN_MESSAGE_BYTES);
    console.error(`relayd producer: relayd closed 1009; writing messages of at most ${this.#messageLimit} bytes`);
    for (const writer of [...this.#streams.values()]) writer._dropOversized(this.#messageLimit);
  }

  #outstanding(): boolean {
    return this.#unacked > 0 || [...this.#streams.values()].some((w) => w._endPending);
  }

  #startHeartbeat(ws: WebSocketLike): void {
    clearInterval(this.#beatTimer);
    this.#lastFrameAt = Date.now();
    this.#heard = false;
    const every = this.#opts.heartbeatMs;
    if (!(every > 0)) return;
    this.#beatTimer = setInterval(() => {
      if (ws !== this.#ws) return clearInterval(this.#beatTimer);
      if (!this.#heard && Date.now() - this.#lastFrameAt >= 2 * every) {
        ws.close(); // dead (half-open): reconnect and resend
        this.#onClose(1006);
        return;
      }
      this.#heard = false;
      if (ws.readyState === OPEN) ws.send('{"op":"ping"}');
    }, every);
    (this.#beatTimer as { unref?: () => void }).unref?.(); // never keeps a Node process alive
  }

  #flush(): void {
    this.#flushScheduled = false;
    const ws = this.#ws;
    if (!ws || ws.readyState !== OPEN) return; // written after the (re)connect
    const dirty = this.#dirty;
    this.#dirty = new Set();
    const limit = this.#messageLimit;
    let message: string[] = [];
    let size = 0;
    for (const writer of dirty) {
      for (const op of writer._ops(limit)) {
        if (message.length && size + op.length + 1 > limit) {
          this.#write(ws, message);
          message = [];
          size = 0;
        }
        message.push(op);
        size += op.length + 1;
      }
    }
    if (message.length) this.#write(ws, message);
  }

  #write(ws: WebSocketLike, frames: string[]): void {
    this.messagesSent += 1;
    ws.send(frames.join("\n"));
  }

  #dispatch(frame: Frame): void {
    const writer = this.#streams.get(frame.stream ?? "");
    if (!writer) {
      if (frame.type === "error") console.warn("relayd refused a producer op:", frame);
      return;
    }
    switch (frame.type) {
      case "ack":
        this.#progress();
        writer._ack(Number(frame.seq), frame.cursor);
        break;
      case "opened":
        writer._onOpened(frame);
        break;
      case "ended":
        this.#progress();
        writer._onEnded(frame);
        break;
      case "cancel":
        writer._onCancel();
        break;
      case "error":
        writer._onError(frame);
        break;
      default:
    }
  }

  #progress(): void {
    this.#outageStart = null;
    this.#attempt = 0;
  }

  #settled(timeoutMs: number): Promise<boolean> {
    const idle = () => this.#unacked === 0 && ![...this.#streams.values()].some((w) => w._endPending);
    if (idle() || this.#failure) return Promise.resolve(idle());
    return new Promise<boolean>((resolve) => {
      const timer = Number.isFinite(timeoutMs) ? setTimeout(() => done(false), timeoutMs) : undefined;
      const waiter = { resolve: () => { if (idle() || this.#failure) done(idle()); else this.#settleWaiters.push(waiter); }, reject: () => done(false) };
      const done = (ok: boolean) => { clearTimeout(timer); resolve(ok); };
      this.#settleWaiters.push(waiter);
    });
  }

  #wakeSettled(): void {
    for (const w of this.#settleWaiters.splice(0)) w.resolve();
  }

  #failAll(error: RelaydError): void {
    if (!this.#failure && error.code !== "closed") {
      this.#failure = error;
      console.error("relayd producer gave up:", error.message);
    }
    this.#closed ||= error.code === "closed";
    clearTimeout(this.#retryTimer);
    clearInterval(this.#beatTimer);
    for (const writer of [...this.#streams.values()]) writer._fail(error, true);
    for (const w of this.#roomWaiters.splice(0)) w.reject(error);
    for (const w of this.#settleWaiters.splice(0)) w.reject(error);
    const ws = this.#ws;
    this.#ws = null;
    if (ws && ws.readyState <= OPEN) ws.close(1000);
  }
}

/**
 * One stream of a Producer: `send()` chunks, then `end()`. Made by `producer.writer()`.
 * `signal` aborts when a consumer asks to cancel (or relayd ends the stream unasked).
 */
export class StreamWriter {
  readonly stream: string;
  readonly contentType: ContentType;
  /** aborted when a consumer asks to cancel, or relayd ended the stream unasked */
  readonly signal: AbortSignal;
  /** resolves with how the stream ended; rejects if it could not be ended (fenced, gave up) */
  readonly ended: Promise<StreamResult>;
  readonly #producer: Producer;
  readonly #encoder: Encoder;
  readonly #streamJson: string;
  readonly #producerId = randomId();
  readonly #abort = new AbortController();
  #epoch: number | null = null;
  #nextSeq = 1;
  #unacked: [number, string][] = []; // (seq, chunk JSON), seq-contiguous
  #acked = 0; // last seq relayd acknowledged (or reported stored) in this epoch
  #sent = 0; // last seq written on the current connection
  #chunks = 0;
  #cursor: string | null = null;
  #openPending = true;
  #openInflight = false;
  #resuming = false; // appends wait for `opened` (a re-open)
  #endRequest: [ProducerEndReason, string] | null = null;
  #endSent = false;
  #done = false;
  #terminal = false;
  #failure: RelaydError | null = null;
  #endedByServer: RelaydError | null = null;
  #cancelCallbacks: (() => void)[] = [];
  #idleWaiters: (() => void)[] = [];
  #settle!: { resolve: (r: StreamResult) => void; reject: (e: unknown) => void };

  /** @internal use `producer.writer()` */
  constructor(producer: Producer, stream: string, contentType: ContentType, encoder: Encoder) {
    this.#producer = producer;
    this.stream = stream;
    this.contentType = contentType;
    this.#encoder = encoder;
    this.#streamJson = JSON.stringify(stream);
    this.signal = this.#abort.signal;
    this.ended = new Promise<StreamResult>((resolve, reject) => { this.#settle = { resolve, reject }; });
    this.ended.catch(() => {});
  }

  /** The cursor of the last acknowledged chunk (null before the first ack). */
  get cursor(): string | null {
    return this.#cursor;
  }

  /** Whether a consumer asked to cancel (or relayd ended the stream unasked). */
  get cancelled(): boolean {
    return this.#abort.signal.aborted;
  }

  /** Why relayd ended the stream unasked (an operator's `relayd streams end`), else null. */
  get endedByServer(): RelaydError | null {
    return this.#endedByServer;
  }

  /** Call `callback` when a consumer asks to cancel (at once if one did). */
  onCancel(callback: () => void): void {
    if (this.cancelled) queueMicrotask(callback);
    else this.#cancelCallbacks.push(callback);
  }

  /**
   * Encode `item` and queue it (written with whatever else is sent in this turn). Resolves once
   * it fits the ack window, not when acknowledged (see `flush()` / `end()`). An item the encoder
   * maps to nothing (undefined, null, "") is skipped.
   */
  async send(item: unknown): Promise<void> {
    this.#checkSend();
    const chunk = this.#encoder(item);
    if (chunk === undefined || chunk === null || chunk === "") return;
    if (this.contentType === "text" && typeof chunk !== "string") {
      throw new RelaydError("content_type", "a text stream takes strings only: use the text encoder");
    }
    const data = JSON.stringify(chunk);
    if (data === undefined) throw new TypeError("the chunk is not JSON-serialisable");
    const size = Buffer.byteLength(data);
    const room = this.#producer._messageLimit - this.#streamJson.length - APPEND_OVERHEAD;
    if (size > room) throw new RelaydError("chunk_too_large", `a chunk of ${size} bytes does not fit a message (${room} bytes)`);
    await this.#producer._reserve(size);
    try {
      this.#checkSend();
    } catch (err) {
      this.#producer._release(size);
      throw err;
    }
    this.#unacked.push([this.#nextSeq++, data]);
    this.#producer._markDirty(this);
  }

  /**
   * End the stream once everything sent is acknowledged; resolves with how relayd stored the
   * end. After a consumer's cancel or an operator's end, resolves with that end.
   */
  end(reason: ProducerEndReason = "completed", message = ""): Promise<StreamResult> {
    if (!this.#endRequest && !this.#done && !this.#terminal) {
      this.#endRequest = [reason, message.slice(0, MAX_END_MESSAGE)];
      this.#producer._markDirty(this);
    }
    return this.ended;
  }

  /** Pipe `source` into this stream and end it (see `Producer.stream`). */
  async pipe<T>(source: Source<T>, raiseOnError = true, cancelChunk?: unknown): Promise<StreamResult> {
    let iterator: AsyncIterator<T> | null = null;
    let error: unknown = null;
    let failed = false;
    const cancelled = new Promise<"cancelled">((resolve) => {
      if (this.signal.aborted) resolve("cancelled");
      this.signal.addEventListener("abort", () => resolve("cancelled"), { once: true });
    });
    try {
      const opened = typeof source === "function" ? await source(this.signal) : source;
      iterator = iteratorOf(opened);
      for (;;) {
        const step = await Promise.race([iterator.next(), cancelled]);
        if (step === "cancelled" || step.done) break;
        await this.send(step.value);
      }
    } catch (err) {
      failed = true;
      error = err;
    }
    if (this.cancelled) {
      closeIterator(iterator);
      if (cancelChunk !== undefined && !this.#endedByServer) await this.send(cancelChunk).catch(() => {});
      const result = await this.end("cancelled");
      return this.#endedByServer ? { ...result, endedByServer: this.#endedByServer } : result;
    }
    if (!failed) return this.end("completed");
    closeIterator(iterator);
    if (error instanceof RelaydError && error === this.#failure) {
      if (!this.#terminal) await this.end("error", error.message).catch(() => {});
      throw error;
    }
    const message = error instanceof Error ? error.message || error.name : String(error);
    const result = await this.end("error", message);
    if (raiseOnError) throw error;
    return { ...result, error };
  }

  // driven by the Producer -------------------------------------------------------------------

  /** @internal */
  get _unackedCount(): number {
    return this.#unacked.length;
  }

  /** @internal */
  get _endPending(): boolean {
    return this.#endRequest !== null && !this.#done && !this.#terminal;
  }

  /** @internal */
  _onOpened(frame: Frame): void {
    this.#openInflight = false;
    const status = frame.status as string;
    if (status !== "open") {
      if (this.#endRequest && status === this.#endRequest[0]) {
        this.#finish(status as EndReason, (frame.cursor as string | null) ?? null); // our end was stored; its answer lost
      } else {
        this._fail(new RelaydError("stream_ended", `the stream already ended (${status})`, { stream: this.stream, reason: status }), true);
      }
      return;
    }
    const epoch = Number(frame.epoch);
    const seq = Number(frame.seq);
    if (this.#resuming && this.#epoch !== null && epoch === this.#epoch && seq < this.#acked) {
      this._fail(new RelaydError("internal",
        `stream ${this.stream}: relayd lost acknowledged chunks (stored ${seq}, acked ${this.#acked})`), true);
      return;
    }
    this.#epoch = epoch;
    if (this.#resuming) {
      this.#resuming = false;
      this._ack(seq, frame.cursor);
      this.#sent = Math.max(seq, this.#acked);
    }
    this.#producer._markDirty(this);
  }

  /** @internal */
  _ack(seq: number, cursor: unknown): void {
    if (seq <= this.#acked) return;
    this.#chunks += seq - this.#acked;
    this.#acked = seq;
    if (typeof cursor === "string") this.#cursor = cursor;
    let freed = 0;
    while (this.#unacked.length && this.#unacked[0]![0] <= seq) freed += Buffer.byteLength(this.#unacked.shift()![1]);
    this.#producer._release(freed);
    if (!this.#unacked.length && this.#endRequest) this.#producer._markDirty(this);
  }

  /** @internal */
  _onEnded(frame: Frame): void {
    const reason = frame.reason as EndReason;
    const cursor = (frame.cursor as string | undefined) ?? null;
    if (!this.#endRequest && !this.#done) {
      // Not the answer to our end: an operator ended the stream. Tell the writer as a cancel is
      // told, and make later sends say what happened.
      const message = typeof frame.message === "string" ? frame.message : "";
      const ended = new RelaydError("stream_ended", `relayd ended the stream (${reason})${message ? `: ${message}` : ""}`,
        { stream: this.stream, reason });
      this.#endedByServer = ended;
      this.#failure ??= ended;
      this._onCancel();
    }
    this.#finish(reason, cursor);
  }

  /** @internal */
  _onCancel(): void {
    if (this.cancelled || this.#done) return;
    this.#abort.abort(new RelaydError("cancelled", "a consumer asked to cancel the stream", { stream: this.stream }));
    for (const callback of this.#cancelCallbacks.splice(0)) {
      try {
        callback();
      } catch (err) {
        console.error("relayd onCancel callback failed", err);
      }
    }
  }

  /** @internal */
  _onError(frame: Frame): void {
    const code = String(frame.code);
    const seq = frame.seq;
    if (TERMINAL_CODES.has(code)) {
      this._fail(refused(frame, this.stream), true);
    } else if (RESYNC_CODES.has(code)) {
      if (seq == null && this.#endSent && code === "store_unavailable") {
        this.#endSent = false; // the end was not stored: write it again, a little later
        this.#producer._markDirty(this, this.#producer._backoffInitialMs);
      } else if (seq == null && this.#openInflight) {
        this.#openInflight = false; // the open failed: open again, a little later
        this.#openPending = true;
        this.#resuming = true;
        this.#producer._markDirty(this, this.#producer._backoffInitialMs);
      } else if (!this.#failure && !this.#openInflight && !this.#openPending) {
        this.#resync();
      }
      // else: a refusal of an op written before the resync; the re-open settles it
    } else if (!this.#failure) {
      this._fail(refused(frame, this.stream), code === "too_many_streams");
    }
  }

  /** @internal */
  _disconnected(): void {
    this.#openPending = true;
    this.#openInflight = false;
    this.#resuming = true;
    this.#endSent = false;
    this.#sent = this.#acked;
  }

  /** @internal fail the stream if an unacknowledged chunk cannot fit a message of `limit` bytes */
  _dropOversized(limit: number): void {
    if (this.#terminal || this.#failure) return;
    const size = Math.max(0, ...this.#unacked.map(([, d]) => Buffer.byteLength(d)));
    if (size && size + this.#streamJson.length + APPEND_OVERHEAD > limit) {
      this._fail(new RelaydError("chunk_too_large", `a chunk of ${size} bytes does not fit the ${limit}-byte messages relayd accepts`), false);
    }
  }

  /** @internal the stream takes no more chunks; if `terminal`, not even an end */
  _fail(error: RelaydError, terminal: boolean): void {
    if (this.#done) return;
    this.#failure ??= error;
    this.#dropUnacked();
    if (terminal) {
      this.#terminal = true;
      this.#done = true;
      this.#settle.reject(error);
      this.#producer._forget(this);
    } else if (this.#endRequest) {
      this.#producer._markDirty(this);
    }
  }

  /** @internal the frames to write now: open, then appends, then end, as due */
  _ops(limit: number): string[] {
    const out: string[] = [];
    if (this.#terminal || this.#done) return out;
    if (this.#openPending) {
      this.#openPending = false;
      this.#openInflight = true;
      // Without an epoch (none received yet), the producer id makes the open idempotent: a repeat
      // after a lost `opened` resumes the epoch the first one started.
      const open: Record<string, unknown> = { op: "open", stream: this.stream };
      if (this.#epoch === null) open.content_type = this.contentType;
      else open.epoch = this.#epoch;
      open.producer = this.#producerId;
      out.push(JSON.stringify(open));
    }
    if (this.#resuming) return out;
    const last = this.#unacked[this.#unacked.length - 1];
    if (!this.#failure && last && last[0] > this.#sent) out.push(...this.#appends(limit));
    if (this.#endRequest && !this.#endSent && !this.#unacked.length && !this.#openInflight) {
      const [reason, message] = this.#endRequest;
      const end: Record<string, unknown> = { op: "end", stream: this.stream, reason };
      if (message) end.message = message;
      out.push(JSON.stringify(end));
      this.#endSent = true;
    }
    return out;
  }

  #appends(limit: number): string[] {
    const first = this.#unacked[0]![0];
    const frames: string[] = [];
    const head = `{"op":"append","stream":${this.#streamJson},"seq":`;
    let batch: string[] = [];
    let batchSeq = 0;
    let size = 0;
    const flush = () => frames.push(`${head}${batchSeq},"chunks":[${batch.join(",")}]}`);
    for (let i = this.#sent + 1 - first; i < this.#unacked.length; i++) {
      const [seq, data] = this.#unacked[i]!;
      if (batch.length && size + data.length + 1 > limit) {
        flush();
        batch = [];
      }
      if (!batch.length) {
        batchSeq = seq;
        size = head.length + APPEND_OVERHEAD;
      }
      batch.push(data);
      size += data.length + 1;
    }
    if (batch.length) flush();
    this.#sent = this.#unacked[this.#unacked.length - 1]![0];
    return frames;
  }

  #resync(): void {
    this.#openPending = true;
    this.#resuming = true;
    this.#endSent = false;
    this.#producer._markDirty(this);
  }

  #checkSend(): void {
    this.#producer._check();
    if (this.#failure) throw this.#failure;
    if (this.#endRequest || this.#done) throw new RelaydError("stream_ended", `stream ${this.stream} was ended`, { stream: this.stream });
  }

  #dropUnacked(): void {
    const freed = this.#unacked.reduce((n, [, d]) => n + Buffer.byteLength(d), 0);
    this.#unacked = [];
    this.#producer._release(freed);
  }

  #finish(reason: EndReason, cursor: string | null): void {
    if (this.#done) return;
    this.#done = true;
    this.#terminal = true;
    this.#dropUnacked();
    this.#settle.resolve({ stream: this.stream, reason, cursor, chunks: this.#chunks });
    this.#producer._forget(this);
  }
}

function refused(frame: Frame, stream: string): RelaydError {
  return new RelaydError(String(frame.code), (frame.message as string | undefined) ?? String(frame.code), { stream });
}

function randomId(): string {
  const bytes = new Uint8Array(16);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function iteratorOf<T>(source: AsyncIterable<T> | Iterable<T> | ReadableStream<T>): AsyncIterator<T> {
  if (typeof (source as ReadableStream<T>).getReader === "function" && !(Symbol.asyncIterator in source)) {
    const reader = (source as ReadableStream<T>).getReader();
    return {
      next: () => reader.read() as Promise<IteratorResult<T>>,
      return: async () => { await reader.cancel(); return { done: true, value: undefined }; },
    };
  }
  if (Symbol.asyncIterator in source) return (source as AsyncIterable<T>)[Symbol.asyncIterator]();
  if (Symbol.iterator in source) {
    const it = (source as Iterable<T>)[Symbol.iterator]();
    return { next: async () => it.next(), return: async () => it.return?.() ?? { done: true, value: undefined } };
  }
  throw new TypeError("stream(): the source must be an async iterable, an iterable or a ReadableStream");
}

/** Close the upstream without waiting: a pending next() cannot be interrupted, only abandoned. */
function closeIterator<T>(iterator: AsyncIterator<T> | null): void {
  if (!iterator?.return) return;
  Promise.resolve().then(() => iterator.return!()).catch(() => {});
}
