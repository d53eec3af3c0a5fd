-- Create a stream for the Durable Streams mount (PUT), or compare it with the one there.
-- KEYS[1] meta, KEYS[2] log, KEYS[3] producers, KEYS[4] the stream's notification channel
-- ARGV[1] now_ms (the new generation), ARGV[2] content type as given, ARGV[3] its media type,
-- ARGV[4] kind (relayd's ct: json|text), ARGV[5] Stream-TTL seconds ('' = none),
-- ARGV[6] Stream-Expires-At as given ('' = none), ARGV[7] deadline ms ('' = none),
-- ARGV[8] closed ('1' | '0'), ARGV[9] publish command ('' = none), ARGV[10] the writing
-- instance's id, ARGV[11..] the initial chunks
-- Returns {'created' | 'exists' | 'conflict', gen, tail (last data offset), closed (1 | 0)}
-- A stream past its deadline is removed first (its keys may outlive it by less than a ms).
-- Notification when created: c|<instance>|<gen>
local now = tonumber(ARGV[1])
local m = redis.call('HMGET', KEYS[1], 'status', 'gen', 'n', 'dmt', 'ct', 'dttl', 'dexp', 'ddl')
if m[1] and m[8] and tonumber(m[8]) <= now then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  m[1] = false
end
if m[1] then
  local closed = m[1] ~= 'open'
  local tail = tonumber(m[3])
  if closed then tail = tail - 1 end
  local media = m[4] or (m[5] == 'text' and 'text/plain' or 'application/json')
  local same = media == ARGV[3] and (m[6] or '') == ARGV[5] and (m[7] or '') == ARGV[6]
    and closed == (ARGV[8] == '1')
  return {same and 'exists' or 'conflict', m[2], tail, closed and 1 or 0}
end
local gen = ARGV[1]
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], 'status', 'open', 'gen', gen, 'epoch', 0, 'base', 0, 'seq', 0, 'ct', ARGV[4],
  'created', gen, 'updated', gen, 'dct', ARGV[2], 'dmt', ARGV[3])
local n = 0
for i = 11, #ARGV do
  n = n + 1
  redis.call('XADD', KEYS[2], gen .. '-' .. n, 'd', ARGV[i])
end
local tail = n
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'dttl', ARGV[5]) end
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'dexp', ARGV[6]) end
if ARGV[8] == '1' then
  n = n + 1
  redis.call('XADD', KEYS[2], gen .. '-' .. n, 'e', 'completed', 'm', '')
  redis.call('HSET', KEYS[1], 'status', 'completed', 'ended', gen)
end
redis.call('HSET', KEYS[1], 'n', n)
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[1], 'ddl', ARGV[7])
  redis.call('PEXPIREAT', KEYS[1], ARGV[7])
  redis.call('PEXPIREAT', KEYS[2], ARGV[7])
end
if ARGV[9] ~= '' then redis.call(ARGV[9], KEYS[4], 'c|' .. ARGV[10] .. '|' .. gen) end
return {'created', gen, tail, ARGV[8] == '1' and 1 or 0}
