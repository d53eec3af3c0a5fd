-- Append chunks, deduplicated by producer sequence number, fenced by epoch; tell other instances.
-- The slow path: most appends are plain XADDs sent by the holding instance (redis_streams.py,
-- _Handle), which runs this script for a stream's first append, after a write failed or the
-- connection was made again, and for any append whose seq is not the next one it expects.
-- KEYS[1] meta, KEYS[2] log, KEYS[3] the stream's notification channel, KEYS[4] the Set of
-- instances following that channel
-- ARGV[1] epoch, ARGV[2] generation the producer opened ('0' = any), ARGV[3] seq of the first
-- chunk, ARGV[4] now_ms, ARGV[5] max_chunks, ARGV[6] open_ttl_s (for a log this append creates), ARGV[7] publish command
-- ('PUBLISH', 'SPUBLISH' on a cluster, '' = none), ARGV[8] the writing instance's id,
-- ARGV[9..] chunks (JSON)
-- A stream deleted and created again starts again at epoch 1: the generation fences a producer
-- of the old one (same epoch number, another stream).
-- Returns {'ok', gen, first_new_offset, last_offset, last_seq, lane, base, stored_seq, ct, followed}
--   (first > last: all duplicates; followed: 1 if an instance other than the writer follows)
--   or {'not_found'} | {'ended', status} | {'fenced', epoch} | {'seq_gap', last_seq}
--   or {'lost', last_seq}: a resent chunk is not in the log though later ones are (Redis lost it)
-- Notification (only when chunks were added and an instance other than the writer follows the
-- stream: a lone instance, or one that holds the producer and the consumers, pays nothing for it),
-- ordered with the write by construction:
--   a|<instance>|<now_ms>|<gen>|<first offset>|<content type>|<count>|<len>:<chunk>|<len>:<chunk>...
local m = redis.call('HMGET', KEYS[1], 'status', 'gen', 'epoch', 'base', 'n', 'ct', 'k')
if not m[1] then return {'not_found'} end
if m[1] ~= 'open' then return {'ended', m[1]} end
local epoch = tonumber(m[3])
if tonumber(ARGV[1]) ~= epoch then return {'fenced', epoch} end
if ARGV[2] ~= '0' and ARGV[2] ~= m[2] then return {'fenced', epoch} end
local gen = m[2]
local lane = tonumber(m[7]) or 0
local base = tonumber(m[4])
local top = log_top(KEYS[2])
local n = top or tonumber(m[5])
local stored = math.max(n - base, 0)
local seq = tonumber(ARGV[3])
if seq > stored + 1 then return {'seq_gap', stored} end
local count = #ARGV - 8
local last_seq = seq + count - 1
local followers = 0
if ARGV[7] ~= '' then
  followers = redis.call('SCARD', KEYS[4])
  if followers == 1 and redis.call('SISMEMBER', KEYS[4], ARGV[8]) == 1 then followers = 0 end
end
local followed = followers > 0 and 1 or 0
local ct = m[6] or 'json'
if seq <= stored then
  -- A resend: what it carries must still be in the log (unless trimmed by the length cap).
  local upto = math.min(last_seq, stored)
  local rows = redis.call('XRANGE', KEYS[2], entry_id(gen, lane, base + seq), entry_id(gen, lane, base + upto))
  if #rows < upto - seq + 1 then
    local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
    if #oldest > 0 and seq_of(oldest[1][1]) <= lane * LANE + base + seq then return {'lost', stored} end
  end
  if last_seq <= stored then
    return {'ok', gen, n + 1, base + last_seq, last_seq, lane, base, stored, ct, followed}
  end
end
local first = n + 1
local from = stored - seq + 2
for i = from, count do
  n = n + 1
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], entry_id(gen, lane, n), 'd', ARGV[8 + i])
end
-- The retention of an open stream is refreshed by its holder's touch (every producer_timeout / 3)
-- and when its producer leaves, not per append; the log gets its TTL when an append creates it.
if not top then redis.call('EXPIRE', KEYS[2], ARGV[6]) end
if followed == 1 then
  local parts = {'a', ARGV[8], ARGV[4], gen, first, ct, n - first + 1}
  for i = from, count do
    local chunk = ARGV[8 + i]
    parts[#parts + 1] = #chunk .. ':' .. chunk
  end
  redis.call(ARGV[7], KEYS[3], table.concat(parts, '|'))
end
return {'ok', gen, first, n, last_seq, lane, base, last_seq, ct, followed}
