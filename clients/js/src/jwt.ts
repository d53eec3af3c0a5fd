/** JWT payloads, read without verifying (to know when a token expires and what it allows). @module */

export interface Claims {
  exp?: number;
  streams?: string[];
  rights?: string[];
  [claim: string]: unknown;
}

/** The claims of a JWT, or null when it is not one. */
export function jwtClaims(token: string): Claims | null {
  try {
    const part = token.split(".")[1]!.replace(/-/g, "+").replace(/_/g, "/");
    const json = atob(part + "=".repeat((4 - (part.length % 4)) % 4));
    const bytes = Uint8Array.from(json, (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === "object" ? (claims as Claims) : null;
  } catch {
    return null;
  }
}

/** Whether `claims` grant `right` on `stream` (docs/protocol.md, "Tokens"). */
export function allows(claims: Claims, stream: string, right: string): boolean {
  const rights = Array.isArray(claims.rights) ? claims.rights : ["read"];
  if (!rights.includes(right)) return false;
  const streams = Array.isArray(claims.streams) ? claims.streams : [];
  return streams.some((s) => s === "*" || s === stream || (s.endsWith("*") && stream.startsWith(s.slice(0, -1))));
}
