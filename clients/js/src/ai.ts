/**
 * The Vercel AI SDK (5 and later) through relayd: generations run in the background, stored as
 * UI message chunks in relayd streams, and a `useChat` page reads them through relayd, so it
 * survives reloads, network loss and tab switches, and `stop()` cancels the generation.
 *
 * Browser: `new RelaydChatTransport({ api: "/api/chat", relaydUrl })` as `useChat({ transport })`.
 * Server: the chat route starts `relayUIMessageStream(producer, streamId, (signal) =>
 * streamText({ ..., abortSignal: signal }).toUIMessageStream())` without awaiting it and
 * answers `{ streamId, token }` (docs/clients.md, "Vercel AI SDK").
 *
 * @module
 */
import type { ChatRequestOptions, ChatTransport, UIMessage, UIMessageChunk } from "ai";

import { type ConnectionOptions, type CursorStore, type Subscription, connect } from "./consumer.js";
import { RelaydError } from "./errors.js";
import type { Source, StreamOptions, StreamResult } from "./producer.js";

/** What the chat route answers to the transport's POST. */
export interface ChatStart {
  /** the relayd stream the generation is written to */
  streamId: string;
  /** a consumer token for it (with the "cancel" right, for stop()) */
  token?: string;
  /** relayd's base URL, when the route knows it better than the page */
  url?: string;
}

export interface RelaydChatTransportOptions
  extends Pick<ConnectionOptions, "backoff" | "heartbeatMs" | "maxRetries" | "WebSocket"> {
  /** the app's chat route (default "/api/chat"): POSTed `{id, messages, trigger, messageId, ...body}`, answers a ChatStart */
  api?: string;
  /** relayd's base URL (default: the route's `url`, else the page's origin) */
  relaydUrl?: string;
  /** headers for the POST */
  headers?: Record<string, string> | Headers;
  /** extra JSON fields for the POST */
  body?: object;
  /** the POST's credentials mode (default "same-origin") */
  credentials?: RequestCredentials;
  /** fetch to use (default: the global one) */
  fetch?: typeof fetch;
  /**
   * a fresh consumer token for a chat's stream: needed to resume (reload) after the route's
   * token expired, and used to refresh it on long generations
   */
  fetchToken?: (options: { chatId: string; streamId: string }) => string | Promise<string>;
  /** where the active stream of each chat is remembered for reconnectToStream (default "session") */
  persist?: "session" | "local" | CursorStore;
  /** stop() (the abort signal) also cancels the generation (default true; the token needs "cancel") */
  cancelOnAbort?: boolean;
  /** how long relayd waits for a stream the producer has not opened yet (default 10 s) */
  waitMs?: number;
}

/**
 * A `ChatTransport` that starts a generation through the app's chat route and reads it from
 * relayd. `reconnectToStream` (useChat's `resume: true`) replays the chat's active stream from
 * its start (`resumeStreamIsReplay`: the page rebuilt after a reload has none of it), or
 * answers null when the chat has none (it finished, or was never started in this tab).
 * A dropped connection is resumed by the consumer itself, from its cursor, invisibly.
 */
export class RelaydChatTransport<UI_MESSAGE extends UIMessage = UIMessage> implements ChatTransport<UI_MESSAGE> {
  readonly resumeStreamIsReplay = true;
  readonly #opts: RelaydChatTransportOptions;

  constructor(options: RelaydChatTransportOptions = {}) {
    this.#opts = options;
  }

  async sendMessages(options: {
    trigger: "submit-message" | "regenerate-message";
    chatId: string;
    messageId: string | undefined;
    messages: UI_MESSAGE[];
    abortSignal: AbortSignal | undefined;
  } & ChatRequestOptions): Promise<ReadableStream<UIMessageChunk>> {
    const { chatId, messages, trigger, messageId, abortSignal } = options;
    const doFetch = this.#opts.fetch ?? globalThis.fetch;
    const headers = new Headers(this.#opts.headers);
    new Headers(options.headers).forEach((value, name) => headers.set(name, value));
    headers.set("Content-Type", "application/json");
    const response = await doFetch(this.#opts.api ?? "/api/chat", {
      method: "POST",
      headers,
      credentials: this.#opts.credentials ?? "same-origin",
      body: JSON.stringify({ ...this.#opts.body, ...options.body, id: chatId, messages, trigger, messageId }),
      signal: abortSignal,
    });
    if (!response.ok) throw new Error((await response.text()) || `the chat route answered ${response.status}`);
    const start = (await response.json()) as ChatStart;
    if (!start || typeof start.streamId !== "string") throw new Error("the chat route must answer {streamId, token}");
    this.#store()?.setItem(activeKey(chatId), JSON.stringify(start));
    return this.#read(chatId, start, abortSignal);
  }

  async reconnectToStream(options: { chatId: string; abortSignal?: AbortSignal } & ChatRequestOptions):
    Promise<ReadableStream<UIMessageChunk> | null> {
    const saved = this.#store()?.getItem(activeKey(options.chatId));
    if (!saved) return null;
    const start = JSON.parse(saved) as ChatStart;
    return this.#read(options.chatId, start, options.abortSignal);
  }

  #store(): CursorStore | null {
    const persist = this.#opts.persist ?? "session";
    if (typeof persist === "object") return persist;
    const storage = (globalThis as Record<string, unknown>)[persist === "local" ? "localStorage" : "sessionStorage"];
    return (storage as CursorStore | undefined) ?? null;
  }

  #read(chatId: string, start: ChatStart, signal: AbortSignal | undefined): ReadableStream<UIMessageChunk> {
    const opts = this.#opts;
    const fetchToken = opts.fetchToken;
    const sub = connect<UIMessageChunk>({
      url: start.url ?? opts.relaydUrl,
      streamId: start.streamId,
      token: start.token,
      fetchToken: fetchToken && (() => fetchToken({ chatId, streamId: start.streamId })),
      backoff: opts.backoff,
      heartbeatMs: opts.heartbeatMs,
      maxRetries: opts.maxRetries,
      WebSocket: opts.WebSocket,
      waitMs: opts.waitMs ?? 10_000,
      signal,
      cancelOnAbort: opts.cancelOnAbort ?? true,
    });
    return uiMessageStream(sub, () => {
      const store = this.#store();
      // The chat's stream is over: a reload has nothing to resume (unless a newer one started).
      if (store?.getItem(activeKey(chatId)) === JSON.stringify(start)) store.setItem(activeKey(chatId), "");
    });
  }
}

function activeKey(chatId: string): string {
  return `relayd:chat:${chatId}`;
}

/**
 * A subscription to a stream of UI message chunks as the ReadableStream a ChatTransport returns.
 * An `error` end that the producer did not report as a chunk becomes an `error` chunk; a
 * cancelled stream closes; a failure (forbidden, gap, ...) errors the stream.
 */
export function uiMessageStream(sub: Subscription<UIMessageChunk>, onEnd: () => void = () => {}):
  ReadableStream<UIMessageChunk> {
  let sawError = false;
  return new ReadableStream<UIMessageChunk>({
    async pull(controller) {
      let step: IteratorResult<UIMessageChunk, undefined>;
      try {
        step = await sub.next();
      } catch (err) {
        return controller.error(err);
      }
      if (!step.done) {
        if (step.value?.type === "error") sawError = true;
        controller.enqueue(step.value);
        return;
      }
      if (sub.status === "ended") {
        const end = await sub.ended;
        if (end.reason === "error" && !sawError) controller.enqueue({ type: "error", errorText: end.message ?? "error" });
        else if (end.reason === "producer_lost") controller.enqueue({ type: "error", errorText: "the generation was lost" });
        onEnd();
      }
      controller.close();
    },
    cancel() {
      sub.close();
    },
  });
}

/** The part of a Producer this module uses (a type: importing it does not load the producer). */
export interface ProducerLike {
  stream<T>(streamId: string, source: Source<T>, options?: StreamOptions): Promise<StreamResult>;
}

/**
 * Relay an AI SDK UI message stream into relayd: every chunk is stored as it is (a
 * UIMessageChunk object). `source` is typically
 * `(signal) => streamText({ model, messages, abortSignal: signal }).toUIMessageStream()`: a
 * consumer's cancel (useChat's stop()) aborts `signal`, stops the model call, appends an
 * `abort` chunk and ends the stream "cancelled". Run it in the background of the chat route
 * (do not await it before answering).
 */
export function relayUIMessageStream(
  producer: ProducerLike,
  streamId: string,
  source: Source<UIMessageChunk>,
  options: Omit<StreamOptions, "contentType" | "encoder" | "cancelChunk"> = {},
): Promise<StreamResult> {
  return producer.stream<UIMessageChunk>(streamId, source, {
    ...options,
    contentType: "json",
    cancelChunk: { type: "abort" } satisfies UIMessageChunk,
    raiseOnError: options.raiseOnError ?? false,
  });
}

export { RelaydError };
