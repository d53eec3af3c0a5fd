/**
 * Mint consumer tokens in your backend (Node, Deno, Bun), with no call to relayd: HS256 JWTs
 * with the claims relayd verifies (docs/protocol.md, "Tokens"), as relayd/client/tokens.py.
 *
 *     import { mintToken } from "@relayd/client/tokens";
 *     const token = mintToken(process.env.RELAYD_JWT_SECRET!, ["chat-42"], { rights: ["read", "cancel"] });
 *
 * @module
 */
import { createHmac } from "node:crypto";

import { RIGHTS, type Right, STREAM_ID_RE } from "./protocol.js";

export interface MintOptions {
  /** what the holder may do (default ["read"]) */
  rights?: readonly Right[];
  /** lifetime in seconds (default 300) */
  ttlS?: number;
  /** the `sub` claim: who the token is for */
  sub?: string;
  /** must equal relayd's `auth.jwt_audience` (default "relayd") */
  audience?: string;
  /** must equal relayd's `auth.jwt_issuer` when that is set */
  issuer?: string;
  /** the clock, in seconds (tests) */
  now?: number;
}

/**
 * A JWT letting its holder read ("read") or cancel ("cancel") `streams`: stream ids, prefixes
 * ending in `*` (`"user-7/*"`) or `"*"`. `secret` is relayd's `auth.jwt_secret` (at least 32
 * characters). Bad arguments throw a TypeError.
 */
export function mintToken(secret: string, streams: readonly string[], options: MintOptions = {}): string {
  const { rights = ["read"], ttlS = 300, sub, audience = "relayd", issuer } = options;
  if (typeof secret !== "string" || secret.length < 32) throw new TypeError("secret must be at least 32 characters");
  if (!Array.isArray(streams) || streams.length === 0) throw new TypeError("streams must be a non-empty list");
  for (const pattern of streams) {
    const id = pattern.endsWith("*") ? pattern.slice(0, -1) : pattern;
    if (typeof pattern !== "string" || (id !== "" && !STREAM_ID_RE.test(id))) {
      throw new TypeError(`invalid stream pattern ${JSON.stringify(pattern)}`);
    }
  }
  if (!Array.isArray(rights) || rights.length === 0 || rights.some((r) => !(RIGHTS as readonly string[]).includes(r))) {
    throw new TypeError(`rights must be a non-empty list of: ${RIGHTS.join(", ")}`);
  }
  if (!Number.isInteger(ttlS) || ttlS <= 0) throw new TypeError("ttlS must be a positive integer");
  const iat = Math.floor(options.now ?? Date.now() / 1000);
  const claims: Record<string, unknown> = {
    streams: [...new Set(streams)],
    rights: [...new Set(rights)],
    iat,
    exp: iat + ttlS,
    aud: audience,
  };
  if (issuer) claims.iss = issuer;
  if (sub !== undefined) claims.sub = sub;
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify(claims));
  const signature = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${signature}`;
}

function b64url(text: string): string {
  return Buffer.from(text, "utf8").toString("base64url");
}
