-- Append chunks, deduplicated by producer sequence number, fenced by epoch; tell other instances.
-- KEYS[1] meta, KEYS[2] log, KEYS[3] the stream's notification channel
-- ARGV[1] epoch, ARGV[2] seq of the first chunk, ARGV[3] now_ms, ARGV[4] max_chunks,
-- ARGV[5] open_ttl_s, ARGV[6] publish command ('PUBLISH', 'SPUBLISH' on a cluster, '' = none),
-- ARGV[7] the writing instance's id, ARGV[8..] chunks (JSON)
-- Returns {'ok', gen, first_new_offset, last_offset, last_seq} (first > last: all duplicates)
--      or {'not_found'} | {'ended', status} | {'fenced', epoch} | {'seq_gap', last_seq}
-- Notification (only when chunks were added), ordered with the write by construction:
--   a|<instance>|<now_ms>|<gen>|<first offset>|<content type>|<count>|<len>:<chunk>|<len>:<chunk>...
local m = redis.call('HMGET', KEYS[1], 'status', 'gen', 'epoch', 'base', 'seq', 'n', 'ct')
if not m[1] then return {'not_found'} end
if m[1] ~= 'open' then return {'ended', m[1]} end
local epoch = tonumber(m[3])
if tonumber(ARGV[1]) ~= epoch then return {'fenced', epoch} end
local stored = tonumber(m[5])
local seq = tonumber(ARGV[2])
if seq > stored + 1 then return {'seq_gap', stored} end
local count = #ARGV - 7
local last_seq = seq + count - 1
local base = tonumber(m[4])
local n = tonumber(m[6])
if last_seq <= stored then
  return {'ok', m[2], n + 1, base + last_seq, last_seq}
end
local first = n + 1
local gen = m[2]
local from = stored - seq + 2
for i = from, count do
  n = n + 1
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], gen .. '-' .. n, 'd', ARGV[7 + i])
end
redis.call('HSET', KEYS[1], 'seq', last_seq, 'n', n, 'updated', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
if ARGV[6] ~= '' then
  local parts = {'a', ARGV[7], ARGV[3], gen, first, m[7] or 'json', n - first + 1}
  for i = from, count do
    local chunk = ARGV[7 + i]
    parts[#parts + 1] = #chunk .. ':' .. chunk
  end
  redis.call(ARGV[6], KEYS[3], table.concat(parts, '|'))
end
return {'ok', gen, first, n, last_seq}
