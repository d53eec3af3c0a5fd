-- Delete a stream for the Durable Streams mount (DELETE): its meta, log and producer state.
-- KEYS[1] meta, KEYS[2] log, KEYS[3] producers; ARGV[1] now_ms
-- Returns 1 if it existed (and was not past its deadline), else 0.
local ddl = redis.call('HGET', KEYS[1], 'ddl')
local existed = redis.call('EXISTS', KEYS[1])
if ddl and tonumber(ddl) <= tonumber(ARGV[1]) then existed = 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return existed
