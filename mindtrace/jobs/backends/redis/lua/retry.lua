-- retry.lua: replace a claimed message's body and queue it again after a delay (after lib.lua).
--
-- KEYS[1] sequence   KEYS[2] ready   KEYS[3] delayed   KEYS[4] leases   KEYS[5] bodies   KEYS[6] tokens
-- KEYS[7] ranks      KEYS[8] deliveries   KEYS[9] wake
-- ARGV[1] message id   ARGV[2] lease token   ARGV[3] priority   ARGV[4] new body   ARGV[5] delay in ms
-- KEYS[10] KEYS[11] ARGV[6..8] (optional) the job's record hash, index and update, as for state_record.lua
--
-- The message keeps its id, starts a new delivery count and goes to the back of its priority. With a delay
-- it waits in the delayed set (promote() in lib.lua makes it ready when due); either way a blocked receiver
-- is woken, to claim it or to learn when to look again.
-- Returns 1 when queued again, -1 when the lease was lost (nothing changes).

if redis.call('HGET', KEYS[6], ARGV[1]) ~= ARGV[2] then
  return settled(-1, 10, 6)
end
redis.call('ZREM', KEYS[4], ARGV[1]) -- a removal first: a full server still takes the script (lib.lua)
redis.call('HDEL', KEYS[6], ARGV[1])
local place = rank(ARGV[3], redis.call('INCR', KEYS[1]))
redis.call('HSET', KEYS[5], ARGV[1], ARGV[4])
redis.call('HDEL', KEYS[8], ARGV[1])
local delay = tonumber(ARGV[5])
if delay > 0 then
  redis.call('HSET', KEYS[7], ARGV[1], string.format('%d', place))
  redis.call('ZADD', KEYS[3], now_ms() + delay, ARGV[1])
else
  redis.call('HDEL', KEYS[7], ARGV[1])
  redis.call('ZADD', KEYS[2], place, ARGV[1])
end
wake(KEYS[9])
return settled(1, 10, 6)
