-- state_start.lua: a consumer starts a job: record RUNNING, then read the cancel request (after lib.lua).
--
-- KEYS[1] the job's record hash   KEYS[2] the queue's record index
-- ARGV[1..3] the RUNNING update, as for state_record.lua
--
-- One step for RedisStateStore.started, so a start costs one round trip. RUNNING is written before the read:
-- a cancel after it finds the job running (and signals it); one before it is in what this returns.
-- Returns false when no cancel was requested, else the reason ("" without one).

record(KEYS[1], KEYS[2], ARGV, 1)
if redis.call('HEXISTS', KEYS[1], 'c') == 1 or redis.call('HGET', KEYS[1], 's') == 'cancelled' then
  return redis.call('HGET', KEYS[1], 'r') or ''
end
return false
