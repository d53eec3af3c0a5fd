/**
 * The one error class of the clients: `code` is relayd's wire error code (docs/protocol.md) or
 * one of the client's own: "gap", "reset", "closed", "timeout", "retries_exhausted",
 * "connection_failed", "ack_timeout".
 *
 * @module
 */
export class RelaydError extends Error {
  readonly code: string;
  /** gap: the last cursor received and the oldest one still stored */
  cursor?: string;
  next?: string;
  /** reset: why the stream was replaced; a stream error: its end reason */
  reason?: string;
  /** the stream the error is about, when known */
  stream?: string;

  constructor(code: string, message?: string, details: Record<string, unknown> = {}) {
    super(message || code, "cause" in details ? { cause: details.cause } : undefined);
    this.name = "RelaydError";
    this.code = code;
    Object.assign(this, details);
  }
}
