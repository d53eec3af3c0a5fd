-- Shared by every script (relayd/store/redis_streams.py puts it in front of each one).
-- A log entry's id is '<gen>-<lane * 2^32 + offset>': offsets (what cursors carry) count the
-- entries of a generation 1, 2, 3...; the lane (meta 'k', 0 at first) goes up by one at each
-- fence (a takeover by a new epoch, an end), so that an append of the fenced producer, a plain
-- XADD with its old lane, is below the log's last id and refused by Redis itself. Lua numbers
-- are doubles: exact while lane * 2^32 + offset < 2^53 (2^21 fences, 2^32 entries).
local LANE = 4294967296

local function entry_id(gen, lane, offset)
  return gen .. '-' .. string.format('%.0f', lane * LANE + offset)
end

local function seq_of(id)
  return tonumber(string.match(id, '-(%d+)$'))
end

-- The offset of the last entry added to the log (deleted since or not); nil: no log.
local function log_top(log)
  if redis.call('EXISTS', log) == 0 then return nil end
  local info = redis.call('XINFO', 'STREAM', log)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then return seq_of(info[i + 1]) % LANE end
  end
  return nil
end

-- Up to count entries of generation gen from offset first on: the lane of an offset is not
-- known in advance, so a row of a later lane below first moves the start to that lane.
local function range_from(log, gen, first, count)
  local lane = 0
  while true do
    local rows = redis.call('XRANGE', log, entry_id(gen, lane, first), gen .. '-18446744073709551615',
      'COUNT', count)
    if #rows == 0 then return rows end
    local seq = seq_of(rows[1][1])
    if seq % LANE >= first then return rows end
    lane = math.floor(seq / LANE)
  end
end
