/**
 * The websocket the clients use: the runtime's own (browsers, Deno, Bun, Node >= 22), else the
 * `ws` package (Node 18 and 20). Bundlers for the browser map `ws` away (package.json "browser").
 *
 * @module
 */

/** The part of the WHATWG WebSocket the clients use (also what `ws` provides). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: any) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: any) => void) | null;
}

/** A WebSocket class: `new WebSocket(url, protocols)`; a third argument `{headers}` where supported. */
export type WebSocketConstructor = new (url: string, protocols?: string | string[], options?: any) => WebSocketLike;

export const OPEN = 1;
export const CLOSING = 2;

/** `given`, else the global WebSocket, else the `ws` package's. */
export async function resolveWebSocket(given?: WebSocketConstructor): Promise<WebSocketConstructor> {
  if (given) return given;
  const global = (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
  if (typeof global === "function") return global;
  return (await nodeWebSocket()) ?? missing();
}

/** The `ws` package's WebSocket, which can send headers (the producer's API key); null without it. */
export async function nodeWebSocket(): Promise<WebSocketConstructor | null> {
  try {
    const mod = await import("ws");
    return (mod.default ?? mod.WebSocket) as unknown as WebSocketConstructor;
  } catch {
    return null;
  }
}

function missing(): never {
  throw new TypeError("relayd: no WebSocket in this runtime: install the `ws` package or pass `WebSocket`");
}
