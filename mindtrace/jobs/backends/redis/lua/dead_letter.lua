-- dead_letter.lua: move a claimed message, with a new body, to the dead-letter queue (after lib.lua).
--
-- KEYS[1] leases   KEYS[2] tokens   KEYS[3] ranks   KEYS[4] bodies   KEYS[5] deliveries   KEYS[6] meta
-- KEYS[7] dead-letter meta   KEYS[8] dead-letter sequence   KEYS[9] dead-letter ready
-- KEYS[10] dead-letter bodies   KEYS[11] dead-letter wake
-- ARGV[1] message id   ARGV[2] lease token   ARGV[3] priority   ARGV[4] new body
-- KEYS[12] KEYS[13] ARGV[5..7] (optional) the job's record hash, index and update, as for state_record.lua
--
-- A queue and its dead-letter queue share a hash tag, so this is one atomic step even on a cluster. A
-- missing dead-letter queue is created with the queue's options. A dead-letter queue is its own.
-- Returns 1 when moved, -1 when the lease was lost (nothing changes).

if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then
  return settled(-1, 12, 5)
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
if redis.call('EXISTS', KEYS[7]) == 0 then
  redis.call('HSET', KEYS[7], 'options', redis.call('HGET', KEYS[6], 'options') or '{}')
end
local sequence = redis.call('INCR', KEYS[8])
local id = string.format('%d', sequence)
redis.call('ZADD', KEYS[9], rank(ARGV[3], sequence), id)
redis.call('HSET', KEYS[10], id, ARGV[4])
wake(KEYS[11])
return settled(1, 12, 5)
