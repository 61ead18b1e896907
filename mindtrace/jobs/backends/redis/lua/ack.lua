-- ack.lua: a claimed message is done; remove it, if the caller still holds its lease (after lib.lua).
--
-- KEYS[1] leases   KEYS[2] tokens   KEYS[3] ranks   KEYS[4] bodies   KEYS[5] deliveries
-- ARGV[1] message id   ARGV[2] lease token
-- KEYS[6] KEYS[7] ARGV[3..5] (optional) the job's record hash, index and update, as for state_record.lua
--
-- Returns 1 when removed, 0 when the message is gone already (settled before: nothing to do),
-- -1 when the lease was lost (it expired and the message is ready again or held by another receiver).

local done = -1 -- the lease was lost
if redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[2] then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('HDEL', KEYS[4], ARGV[1])
  redis.call('HDEL', KEYS[5], ARGV[1])
  done = 1
elseif redis.call('HEXISTS', KEYS[4], ARGV[1]) == 0 then
  done = 0
end
return settled(done, 6, 3)
