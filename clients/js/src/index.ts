/**
 * `@relayd/client`: follow relayd streams from a browser or Node (the consumer). The producer
 * is `@relayd/client/producer`, token minting `@relayd/client/tokens`, the Vercel AI SDK
 * transport `@relayd/client/ai`, the wire constants `@relayd/client/protocol`.
 *
 * @module
 */
export {
  Connection, Subscription, connect, openConnection,
  type ConnectOptions, type ConnectionOptions, type ConnectionStatus, type CursorStore, type End,
  type SubscribeOptions, type SubscriptionStatus,
} from "./consumer.js";
export { RelaydError } from "./errors.js";
export { openaiText, textDeltas } from "./openai.js";
export type { EndReason, Json } from "./protocol.js";
export type { WebSocketConstructor, WebSocketLike } from "./websocket.js";
