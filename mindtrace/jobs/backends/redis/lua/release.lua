-- release.lua: give a claimed message back, ready at once at its old place (after lib.lua).
--
-- KEYS[1] ready   KEYS[2] leases   KEYS[3] tokens   KEYS[4] ranks   KEYS[5] deliveries   KEYS[6] wake
-- ARGV[1] message id   ARGV[2] lease token
-- KEYS[7] KEYS[8] ARGV[3..10] (optional) the job's record hash, index and update, as for state_record.lua
--
-- The claim it is released from does not count as a delivery: the count goes back by one.
-- Returns 1 when released, -1 when the lease was lost (the message is back or elsewhere already).

if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[2] then
  return settled(-1, 7, 3)
end
local place = redis.call('HGET', KEYS[4], ARGV[1]) or (MAX_PRIORITY * PRIORITY_BAND)
redis.call('ZREM', KEYS[2], ARGV[1]) -- a removal first: a full server still takes the script (lib.lua)
redis.call('ZADD', KEYS[1], place, ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('HINCRBY', KEYS[5], ARGV[1], -1)
wake(KEYS[6])
return settled(1, 7, 3)
