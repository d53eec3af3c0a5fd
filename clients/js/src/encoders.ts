/**
 * Encoders turn what an upstream yields into chunks: `encoder(item) -> JSON value | string |
 * undefined`. `undefined`, `null` or `""` means "nothing to send for this item" (an OpenAI chunk
 * with only a role), so streams hold no empty chunks. As relayd/client/encoding.py.
 *
 * @module
 */
import type { ContentType } from "./protocol.js";

export type Encoder = (item: any) => unknown;

/** `item` as it is (it must be JSON-serialisable); objects with `toJSON` serialise through it. */
export function jsonEncoder(item: unknown): unknown {
  return item;
}

const ANTHROPIC_EVENTS = new Set([
  "message_start", "message_delta", "message_stop", "content_block_start", "content_block_stop", "ping",
]);

/**
 * The text of `item`, for `text` streams: a string as is; an OpenAI chat-completion chunk's
 * `choices[0].delta.content`; a Responses `response.output_text.delta`'s `delta`; an Anthropic
 * `content_block_delta`'s text; an AI SDK `text-delta` UI message chunk's `delta`; "" for the
 * other events of those formats; anything else `String(item)`.
 */
export function textEncoder(item: any): string {
  if (typeof item === "string") return item;
  if (item && typeof item === "object") {
    if (Array.isArray(item.choices) && (item.object === undefined || item.object === "chat.completion.chunk")) {
      const content = item.choices[0]?.delta?.content;
      return typeof content === "string" ? content : "";
    }
    const kind = item.type;
    if (typeof kind === "string") {
      if (kind === "response.output_text.delta" || kind === "text-delta") {
        return typeof item.delta === "string" ? item.delta : "";
      }
      if (kind === "content_block_delta") return typeof item.delta?.text === "string" ? item.delta.text : "";
      if (kind.startsWith("response.") || ANTHROPIC_EVENTS.has(kind)) return "";
    }
  }
  return String(item);
}

/** The encoder a stream of `contentType` uses when none is given. */
export function defaultEncoder(contentType: ContentType): Encoder {
  return contentType === "text" ? textEncoder : jsonEncoder;
}
