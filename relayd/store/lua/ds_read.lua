-- Read a stream for the Durable Streams mount (GET, HEAD): its state and entries, in one step.
-- KEYS[1] meta, KEYS[2] log, KEYS[3] producers
-- ARGV[1] now_ms, ARGV[2] generation of the offset ('' = from the start), ARGV[3] the offset
-- (entries after it), ARGV[4] count (0: the state only), ARGV[5] '1': restart a sliding TTL
-- Returns {} (no such stream, or past its deadline: removed) or
--   {gen, n, status, dct, dmt, ct, dttl, dexp, after, entry id, fields, entry id, fields, ...}
-- after: where the entries start (an older generation's offset: 0), -1 for an offset this
-- stream never issued (a newer generation, past its last entry).
local now = tonumber(ARGV[1])
local m = redis.call('HMGET', KEYS[1], 'status', 'gen', 'n', 'dct', 'dmt', 'ct', 'dttl', 'dexp', 'ddl')
if not m[1] then return {} end
if m[9] and tonumber(m[9]) <= now then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  return {}
end
if ARGV[5] == '1' and m[7] then
  local ddl = tostring(now + tonumber(m[7]) * 1000)
  redis.call('HSET', KEYS[1], 'ddl', ddl)
  for i = 1, 3 do redis.call('PEXPIREAT', KEYS[i], ddl) end
end
local gen, n = m[2], math.max(tonumber(m[3]), log_top(KEYS[2]) or 0)
local after = 0
if ARGV[2] ~= '' then
  local g = tonumber(ARGV[2])
  if g == tonumber(gen) then
    after = tonumber(ARGV[3])
  elseif g > tonumber(gen) then
    after = -1
  end
end
if after > n then after = -1 end
local reply = {gen, n, m[1], m[4] or '', m[5] or '', m[6] or 'json', m[7] or '', m[8] or '', after}
if after >= 0 and after < n and tonumber(ARGV[4]) > 0 then
  local rows = range_from(KEYS[2], gen, after + 1, ARGV[4])
  for _, row in ipairs(rows) do
    reply[#reply + 1] = row[1]
    reply[#reply + 1] = row[2]
  end
end
return reply
