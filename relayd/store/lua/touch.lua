-- Record producer activity on an open stream (a connected producer keeps its streams alive,
-- however long it is silent: the retention of an open stream restarts too).
-- KEYS[1] meta, KEYS[2] log; ARGV[1] now_ms, ARGV[2] open_ttl_s. Returns 1 if open, else 0.
if redis.call('HGET', KEYS[1], 'status') == 'open' then
  redis.call('HSET', KEYS[1], 'updated', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('EXPIRE', KEYS[2], ARGV[2])
  end
  return 1
end
return 0
