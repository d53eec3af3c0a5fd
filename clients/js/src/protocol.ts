/**
 * relayd's wire protocol, version 1 (docs/protocol.md): every op name, frame type, end reason,
 * error code and close code the clients use, in one place. Mirrors relayd/protocol.py and
 * relayd/errors.py; tests/test_js_protocol.py checks that the two agree.
 *
 * @module
 */

/** The websocket subprotocol of consumer connections; the token goes as `bearer.<jwt>` beside it. */
export const SUBPROTOCOL = "relayd.v1";
/** Prefix of the subprotocol that carries a consumer token. */
export const BEARER_PROTOCOL = "bearer.";

/** Endpoint paths, relative to relayd's base URL. */
export const PATHS = {
  ingest: "/v1/ingest",
  consume: "/v1/ws",
  tokens: "/v1/tokens",
  client: "/v1/client.js",
} as const;

/** Ops a producer sends on /v1/ingest. */
export const PRODUCER_OPS = ["open", "append", "end", "ping"] as const;
export type ProducerOpName = (typeof PRODUCER_OPS)[number];

/** Ops a consumer sends on /v1/ws. */
export const CONSUMER_OPS = ["subscribe", "unsubscribe", "cancel", "auth", "ping"] as const;
export type ConsumerOpName = (typeof CONSUMER_OPS)[number];

/** Frame types relayd sends to producers. */
export const PRODUCER_FRAME_TYPES = ["opened", "ack", "ended", "pong", "cancel", "error"] as const;
/** Frame types relayd sends to consumers. */
export const CONSUMER_FRAME_TYPES = [
  "subscribed", "chunk", "end", "gap", "reset", "error", "unsubscribed", "cancel_requested", "authed", "pong",
] as const;

/** How a stream ends. */
export const END_REASONS = ["completed", "error", "cancelled", "producer_lost"] as const;
export type EndReason = (typeof END_REASONS)[number];
/** The end reasons a producer may give. */
export const PRODUCER_END_REASONS = ["completed", "error", "cancelled"] as const;
export type ProducerEndReason = (typeof PRODUCER_END_REASONS)[number];

export const CONTENT_TYPES = ["json", "text"] as const;
export type ContentType = (typeof CONTENT_TYPES)[number];

/** Consumer token rights. */
export const RIGHTS = ["read", "cancel"] as const;
export type Right = (typeof RIGHTS)[number];

/** Every wire error `code` (docs/protocol.md, "Error codes"). */
export const ERROR_CODES = [
  "bad_frame", "unknown_op", "invalid_stream_id", "chunk_too_large", "not_open", "content_type", "seq_gap",
  "fenced", "stream_ended", "too_many_streams", "store_unavailable", "stream_not_found", "unauthorized",
  "token_expired", "forbidden", "shutting_down", "not_configured", "internal",
] as const;
export type ErrorCode = (typeof ERROR_CODES)[number];

/** Websocket close codes relayd uses (docs/protocol.md, "Close codes"). */
export const CLOSE_CODES = {
  NORMAL: 1000,
  MESSAGE_TOO_BIG: 1009,
  SERVICE_RESTART: 1012,
  UNAUTHORIZED: 4001,
  TOKEN_EXPIRED: 4002,
  FORBIDDEN: 4003,
  SLOW_CONSUMER: 4008,
} as const;

/** A stream id: 1 to 200 characters from `A-Z a-z 0-9 _ - . : / @ =`. */
export const STREAM_ID_RE = /^[A-Za-z0-9_\-.:/@=]{1,200}$/;
/** A producer id (the `producer` field of `open`). */
export const PRODUCER_ID_RE = /^[A-Za-z0-9_.:\-]{1,64}$/;
/** The longest `message` of an `end`. */
export const MAX_END_MESSAGE = 1000;
/** The largest integer relayd takes in an epoch, seq, cursor part or wait_ms (2^53 - 1). */
export const MAX_EXACT_INT = Number.MAX_SAFE_INTEGER;

export function isValidStreamId(id: unknown): id is string {
  return typeof id === "string" && STREAM_ID_RE.test(id);
}

// -- frames ------------------------------------------------------------------------------------

/** The JSON value a chunk holds (a string on `text` streams). */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

export interface ChunkFrame { type: "chunk"; stream: string; cursor: string; data: unknown }
export interface EndFrame { type: "end"; stream: string; cursor: string; reason: EndReason; message?: string }
export interface GapFrame { type: "gap"; stream: string; cursor: string; next: string }
export interface ResetFrame { type: "reset"; stream: string; reason: string }
export interface ErrorFrame { type: "error"; code: string; message?: string; stream?: string; seq?: number }
export interface OpenedFrame {
  type: "opened"; stream: string; epoch: number; seq: number; cursor: string | null; status: string;
  content_type?: ContentType; producer?: string;
}
export interface AckFrame { type: "ack"; stream: string; seq: number; cursor: string }
export interface EndedFrame { type: "ended"; stream: string; reason: EndReason; cursor?: string; message?: string }

/** Any frame relayd sends: `type` names it; unknown types and fields are to be ignored. */
export interface Frame { type: string; stream?: string; [field: string]: unknown }

/** Split one websocket message (NDJSON: one or more objects, `\n`-separated) into frames. */
export function parseMessage(data: unknown): Frame[] {
  const text = typeof data === "string" ? data : String(data);
  const frames: Frame[] = [];
  for (const line of text.split("\n")) {
    if (line.trim()) frames.push(JSON.parse(line) as Frame);
  }
  return frames;
}
