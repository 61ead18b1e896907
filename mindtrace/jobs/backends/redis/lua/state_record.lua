-- state_record.lua: apply one StateUpdate to a job's record (RedisStateStore.record; after lib.lua).
--
-- KEYS[1] the job's record hash   KEYS[2] the queue's record index (job id -> expiry ms, +inf while not terminal)
-- ARGV[1] the update's JSON (StateUpdate.to_fields)   ARGV[2] "kind|status|terminal (1/0)|ttl ms (empty: kept)|at ms|
-- attempts|do not start after, ms (empty: none)|job id"   ARGV[3] the job's event channel
--
-- The same three arguments follow the settle scripts' own when they write a record (RedisClient with its own
-- store). Returns 1 when the record changed (its channel is told), 0 when the update changes nothing.

return record(KEYS[1], KEYS[2], ARGV, 1)
