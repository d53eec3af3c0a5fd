-- Record producer activity on an open stream (a connected producer keeps its streams alive).
-- KEYS[1] meta; ARGV[1] now_ms. Returns 1 if the stream is open, else 0.
if redis.call('HGET', KEYS[1], 'status') == 'open' then
  redis.call('HSET', KEYS[1], 'updated', ARGV[1])
  return 1
end
return 0
