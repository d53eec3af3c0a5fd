-- Open (take over, resume or create) a stream for a producer.
-- KEYS[1] meta, KEYS[2] log, KEYS[3] the stream's notification channel
-- ARGV[1] epoch ("" = take over with a new epoch), ARGV[2] now_ms, ARGV[3] content type,
-- ARGV[4] open_ttl_s, ARGV[5] producer id ("" = none),
-- ARGV[6] publish command ('PUBLISH', 'SPUBLISH', '' = none), ARGV[7] the writing instance's id
-- Returns {code, gen, epoch, seq, n, status, content_type}; code is created|opened|resumed|fenced|ended
-- Notification when created (consumers waiting on other instances): c|<instance>|<gen>
-- The meta's 'pid' is the producer id that started epoch 'pidep'. An open without an epoch from
-- that producer, while 'pidep' is still the current epoch, resumes the epoch instead of taking it
-- over: repeating an open whose answer was lost (the connection dropped) must not restart the
-- sequence numbers. 'pidep' makes a stale 'pid' harmless (an epoch started by a relayd that does
-- not know producer ids, during a rolling upgrade, leaves it behind).
-- Appends are plain XADDs (redis_streams.py), so the meta does not follow them: the last offset
-- is the log's newest entry, and the epoch's last seq is that offset less 'base'. A new epoch
-- fences the old one's appends still on their way by moving the log to the next lane (lib.lua).
local m = redis.call('HMGET', KEYS[1], 'status', 'gen', 'epoch', 'base', 'n', 'ct', 'pid', 'pidep', 'k', 'seq')
local now = ARGV[2]
local pid = ARGV[5]
if not m[1] then
  -- The generation is Redis's clock, one clock for every instance: a stream removed and created
  -- again gets a larger one, so a late append of the old generation cannot land in the new log.
  local t = redis.call('TIME')
  local gen = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local orphan = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  if #orphan > 0 then  -- a log that outlived its meta: its ids must stay below the new ones
    local g = tonumber(string.match(orphan[1][1], '^(%d+)-'))
    if g >= gen then gen = g + 1 end
  end
  gen = string.format('%.0f', gen)
  local epoch = 1
  if ARGV[1] ~= '' then epoch = tonumber(ARGV[1]) end
  redis.call('HSET', KEYS[1], 'status', 'open', 'gen', gen, 'epoch', epoch, 'base', 0, 'seq', 0,
    'n', 0, 'ct', ARGV[3], 'created', gen, 'updated', gen)
  if pid ~= '' then redis.call('HSET', KEYS[1], 'pid', pid, 'pidep', epoch) end
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  if ARGV[6] ~= '' then redis.call(ARGV[6], KEYS[3], 'c|' .. ARGV[7] .. '|' .. gen) end
  return {'created', gen, epoch, 0, 0, 'open', ARGV[3]}
end
local epoch = tonumber(m[3])
if m[1] ~= 'open' then
  return {'ended', m[2], epoch, tonumber(m[10]), tonumber(m[5]), m[1], m[6]}
end
local base = tonumber(m[4])
local n = log_top(KEYS[2]) or tonumber(m[5])
local seq = math.max(n - base, 0)
if ARGV[1] == '' then
  if pid ~= '' and m[7] == pid and tonumber(m[8]) == epoch then
    redis.call('HSET', KEYS[1], 'updated', now)
    return {'resumed', m[2], epoch, seq, n, m[1], m[6]}
  end
  -- Lua numbers are doubles: past 2^53 - 1, epoch + 1 == epoch and two takeovers would share one.
  if epoch >= 9007199254740991 then
    return {'fenced', m[2], epoch, seq, n, m[1], m[6]}
  end
  epoch = epoch + 1
elseif tonumber(ARGV[1]) < epoch then
  return {'fenced', m[2], epoch, seq, n, m[1], m[6]}
elseif tonumber(ARGV[1]) == epoch then
  redis.call('HSET', KEYS[1], 'updated', now)
  return {'resumed', m[2], epoch, seq, n, m[1], m[6]}
else
  epoch = tonumber(ARGV[1])
end
-- a new epoch: its sequence numbers start again at 1, after the entries already stored, in a new
-- lane: the old epoch's appends in flight are below the log's last id from now on
local lane = (tonumber(m[9]) or 0) + 1
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('XSETID', KEYS[2], entry_id(m[2], lane, n))
end
redis.call('HSET', KEYS[1], 'epoch', epoch, 'base', n, 'seq', 0, 'n', n, 'k', lane, 'updated', now)
if pid ~= '' then
  redis.call('HSET', KEYS[1], 'pid', pid, 'pidep', epoch)
else
  redis.call('HDEL', KEYS[1], 'pid', 'pidep')
end
return {'opened', m[2], epoch, 0, n, m[1], m[6]}
