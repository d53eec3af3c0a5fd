-- Append to (and/or close) a stream for the Durable Streams mount (POST), atomically with its checks.
-- KEYS[1] meta, KEYS[2] log, KEYS[3] producers, KEYS[4] the stream's notification channel
-- ARGV[1] now_ms, ARGV[2] the body's media type ('' = a close only: not checked),
-- ARGV[3] close ('1' | '0'), ARGV[4] Stream-Seq ('' = none), ARGV[5] producer id ('' = none),
-- ARGV[6] producer epoch, ARGV[7] producer seq (decimal, no leading zeros), ARGV[8] publish
-- command ('' = none), ARGV[9] the writing instance's id, ARGV[10..] chunks
-- Checks in the protocol's order: closed (a retry of the append that closed it is a duplicate),
-- content type, producer, Stream-Seq (byte-wise string order). Returns
--   {'ok', gen, first, last, closed}        chunks first..last written (first > last: none)
--   {'closed', gen, tail} | {'content_type', gen, n} | {'stream_seq', gen, n}
--   {'duplicate', gen, n, closed, last accepted seq} | {'stale_epoch', gen, n, current epoch}
--   {'epoch_seq', gen, n} | {'seq_gap', gen, n, last accepted seq ('-1': none), received seq}
--   {'not_found'}
-- Producer state: field <producer id> of KEYS[3] = '<epoch> <last seq>'; meta 'dcl' = the
-- '<id> <epoch> <seq>' that closed the stream. Every answer but not_found restarts a sliding TTL.
-- Notifications as append.lua and end.lua write them (a|... for the chunks, e|... for the close).
local now = tonumber(ARGV[1])
local m = redis.call('HMGET', KEYS[1], 'status', 'gen', 'n', 'dmt', 'ct', 'ddl', 'dttl', 'dsq', 'dcl', 'k')
if not m[1] then return {'not_found'} end
if m[6] and tonumber(m[6]) <= now then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  return {'not_found'}
end
local ddl = m[6]
if m[7] then
  ddl = tostring(now + tonumber(m[7]) * 1000)
  redis.call('HSET', KEYS[1], 'ddl', ddl)
end
local function expire()
  if ddl then
    for i = 1, 3 do redis.call('PEXPIREAT', KEYS[i], ddl) end
  end
end
-- (a relayd producer may have written it too: its appends do not move the meta's 'n')
local gen, n = m[2], math.max(tonumber(m[3]), log_top(KEYS[2]) or 0)
local lane = tonumber(m[10]) or 0
local pid = ARGV[5]
local tuple = pid .. ' ' .. ARGV[6] .. ' ' .. ARGV[7]
if m[1] ~= 'open' then
  expire()
  if pid ~= '' and m[9] == tuple then return {'duplicate', gen, n - 1, 1, ARGV[7]} end
  return {'closed', gen, n - 1}
end
local media = m[4] or (m[5] == 'text' and 'text/plain' or 'application/json')
if ARGV[2] ~= '' and ARGV[2] ~= media then
  expire()
  return {'content_type', gen, n}
end
if pid ~= '' then
  local epoch, seq = tonumber(ARGV[6]), tonumber(ARGV[7])
  local st = redis.call('HGET', KEYS[3], pid)
  if not st then
    if seq ~= 0 then expire() return {'seq_gap', gen, n, '-1', ARGV[7]} end
  else
    local sp = string.find(st, ' ', 1, true)
    local se, ss = string.sub(st, 1, sp - 1), string.sub(st, sp + 1)
    if epoch < tonumber(se) then expire() return {'stale_epoch', gen, n, se} end
    if epoch > tonumber(se) then
      if seq ~= 0 then expire() return {'epoch_seq', gen, n} end
    elseif seq <= tonumber(ss) then
      expire()
      return {'duplicate', gen, n, 0, ss}
    elseif seq ~= tonumber(ss) + 1 then
      expire()
      return {'seq_gap', gen, n, ss, ARGV[7]}
    end
  end
end
if ARGV[4] ~= '' and m[8] and ARGV[4] <= m[8] then
  expire()
  return {'stream_seq', gen, n}
end
local first = n + 1
for i = 10, #ARGV do
  n = n + 1
  redis.call('XADD', KEYS[2], entry_id(gen, lane, n), 'd', ARGV[i])
end
local last = n
redis.call('HSET', KEYS[1], 'n', n, 'updated', ARGV[1])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'dsq', ARGV[4]) end
if pid ~= '' then redis.call('HSET', KEYS[3], pid, ARGV[6] .. ' ' .. ARGV[7]) end
local publish = ARGV[8]
if publish ~= '' and last >= first then
  local parts = {'a', ARGV[9], ARGV[1], gen, first, m[5] or 'json', last - first + 1}
  for i = 10, #ARGV do parts[#parts + 1] = #ARGV[i] .. ':' .. ARGV[i] end
  redis.call(publish, KEYS[4], table.concat(parts, '|'))
end
local closed = 0
if ARGV[3] == '1' then
  n = n + 1
  redis.call('XADD', KEYS[2], entry_id(gen, lane + 1, n), 'e', 'completed', 'm', '')
  redis.call('HSET', KEYS[1], 'status', 'completed', 'n', n, 'k', lane + 1, 'ended', ARGV[1])
  if pid ~= '' then redis.call('HSET', KEYS[1], 'dcl', tuple) end
  if publish ~= '' then
    redis.call(publish, KEYS[4], table.concat({'e', ARGV[9], gen, n, 'completed', ''}, '|'))
  end
  closed = 1
end
expire()
return {'ok', gen, first, last, closed}
