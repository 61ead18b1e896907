-- publish.lua: queue one or more messages (after lib.lua).
--
-- KEYS[1] meta   KEYS[2] sequence   KEYS[3] ready   KEYS[4] bodies   KEYS[5] wake
-- ARGV[1] priority_1   ARGV[2] id_1   ARGV[3] body_1   ARGV[4] priority_2   ARGV[5] id_2 ...
-- With records (RedisClient with its own store): KEYS[6] the queue's record index, KEYS[6 + i] message i's
-- record hash, and each message's three arguments followed by its QUEUED update's three (state_record.lua).
--
-- The message id is the job id; each message is ranked by priority, then the next sequence number. A job id
-- already in the queue (ready, claimed or waiting to be retried: it has a body) is not queued again, so a
-- publish that the driver sent twice (its answer timed out) queues each job once, and records it once.
-- Returns -1 when the queue does not exist (nothing is queued), else the number of messages queued.

if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
local stride = KEYS[6] and 6 or 3
local count = #ARGV / stride
local first = redis.call('INCRBY', KEYS[2], count) - count
local queued = 0
for i = 1, count do
  local at = stride * (i - 1)
  local id = ARGV[at + 2]
  if redis.call('HSETNX', KEYS[4], id, ARGV[at + 3]) == 1 then
    redis.call('ZADD', KEYS[3], rank(ARGV[at + 1], first + i), id)
    if stride == 6 then
      record(KEYS[6 + i], KEYS[6], ARGV, at + 4)
    end
    queued = queued + 1
  end
end
if queued > 0 then
  wake(KEYS[5])
end
return queued
