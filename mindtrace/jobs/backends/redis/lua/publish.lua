-- publish.lua: queue one or more messages (after lib.lua).
--
-- KEYS[1] meta   KEYS[2] sequence   KEYS[3] ready   KEYS[4] bodies   KEYS[5] wake
-- ARGV[1] priority_1   ARGV[2] body_1   ARGV[3] priority_2   ARGV[4] body_2 ...
--
-- Each message gets the next sequence number as its id and is ranked by priority, then sequence.
-- Returns 0 when the queue does not exist (nothing is queued), else the number of messages queued.

if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local count = #ARGV / 2
local first = redis.call('INCRBY', KEYS[2], count) - count
for i = 1, count do
  local sequence = first + i
  local id = string.format('%d', sequence)
  redis.call('ZADD', KEYS[3], rank(ARGV[2 * i - 1], sequence), id)
  redis.call('HSET', KEYS[4], id, ARGV[2 * i])
end
wake(KEYS[5])
return count
