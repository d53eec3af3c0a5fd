/** Text out of OpenAI-shaped chunks, as a producer relaying an OpenAI stream stores them. @module */

/**
 * The text of one OpenAI-shaped chunk: a chat-completion chunk's `choices[0].delta.content`,
 * a legacy completion's `choices[0].text`, a Responses API `response.output_text.delta`, or a
 * plain string as is. "" when it carries no text (role-only, tool-call or usage chunks).
 */
export function openaiText(chunk: unknown): string {
  if (typeof chunk === "string") return chunk;
  if (!chunk || typeof chunk !== "object") return "";
  const c = chunk as { choices?: unknown; type?: unknown; delta?: unknown };
  const choice = Array.isArray(c.choices) ? (c.choices[0] as { delta?: { content?: unknown }; text?: unknown }) : undefined;
  const text = choice?.delta?.content ?? choice?.text ?? (c.type === "response.output_text.delta" ? c.delta : undefined);
  return typeof text === "string" ? text : "";
}

/**
 * The text deltas of an iterable of OpenAI-shaped chunks (a Subscription, typically), skipping
 * chunks without text. Leaving the loop early closes the source.
 */
export async function* textDeltas(source: AsyncIterable<unknown>): AsyncGenerator<string, void, undefined> {
  for await (const chunk of source) {
    const text = openaiText(chunk);
    if (text) yield text;
  }
}
