-- End a stream: append the end entry, record the reason, start the retention TTL; tell other instances.
-- KEYS[1] meta, KEYS[2] log, KEYS[3] the stream's notification channel
-- ARGV[1] reason, ARGV[2] message, ARGV[3] now_ms, ARGV[4] ttl_after_end_s,
-- ARGV[5] epoch ("" = not a producer: relayd or an admin), ARGV[6] stale_before_ms ("" = always;
-- otherwise only if the stream's last producer activity is older: the producer-lost sweep),
-- ARGV[7] publish command ('PUBLISH', 'SPUBLISH', '' = none), ARGV[8] the writing instance's id
-- Returns {'ok', gen, offset} | {'already', gen, offset, status} | {'not_found'} |
--         {'fenced', epoch} | {'alive'}
-- The end entry goes in the next lane (lib.lua): appends of the producer still on their way are
-- refused by Redis from then on. The meta records the last offset and seq for good.
-- Notification: e|<instance>|<gen>|<offset>|<reason>|<message>
local m = redis.call('HMGET', KEYS[1], 'status', 'gen', 'epoch', 'n', 'updated', 'base', 'k')
if not m[1] then return {'not_found'} end
if m[1] ~= 'open' then return {'already', m[2], tonumber(m[4]), m[1]} end
if ARGV[5] ~= '' and tonumber(ARGV[5]) ~= tonumber(m[3]) then return {'fenced', tonumber(m[3])} end
if ARGV[6] ~= '' and tonumber(m[5]) >= tonumber(ARGV[6]) then return {'alive'} end
local top = log_top(KEYS[2]) or tonumber(m[4])
local n = top + 1
local lane = (tonumber(m[7]) or 0) + 1
redis.call('XADD', KEYS[2], entry_id(m[2], lane, n), 'e', ARGV[1], 'm', ARGV[2])
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'n', n, 'seq', math.max(top - (tonumber(m[6]) or 0), 0), 'k', lane,
  'ended', ARGV[3], 'updated', ARGV[3], 'message', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
if ARGV[7] ~= '' then
  redis.call(ARGV[7], KEYS[3], table.concat({'e', ARGV[8], m[2], n, ARGV[1], ARGV[2]}, '|'))
end
return {'ok', m[2], n}
