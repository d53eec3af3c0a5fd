/**
 * The browser build served by relayd at /v1/client.js: the consumer of `@relayd/client`, whose
 * `url` defaults to the relayd this module was loaded from.
 *
 *     import { connect, textDeltas } from "https://relayd.example.com/v1/client.js";
 *     const sub = connect({ streamId: "chat-42", fetchToken, persist: "session" });
 *     for await (const chunk of sub) render(chunk);
 *
 * @module
 */
import {
  type ConnectOptions, Connection, type ConnectionOptions, type Subscription,
  connect as connectTo, openConnection as openConnectionTo,
} from "./consumer.js";

export { Connection, Subscription } from "./consumer.js";
export { RelaydError } from "./errors.js";
export { openaiText, textDeltas } from "./openai.js";

/** relayd's base URL when this module was loaded from its /v1/client.js (a path prefix is kept). */
const SERVED_AT = /\/v1\/client\.js(?:[?#].*)?$/;
const MODULE_BASE = SERVED_AT.test(import.meta.url)
  ? import.meta.url.replace(SERVED_AT, "")
  : new URL(import.meta.url).origin;

/** Follow one stream; `url` defaults to the relayd this module was loaded from. */
export function connect<Chunk = unknown>(options: ConnectOptions<Chunk>): Subscription<Chunk> {
  return connectTo<Chunk>({ ...options, url: options?.url || MODULE_BASE });
}

/** A connection for several streams; `url` defaults to the relayd this module was loaded from. */
export function openConnection(options: ConnectionOptions = {}): Connection {
  return openConnectionTo({ ...options, url: options.url || MODULE_BASE });
}
