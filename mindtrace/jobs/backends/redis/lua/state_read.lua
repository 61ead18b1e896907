-- state_read.lua: a job's record as it is (RedisStateStore reads; after lib.lua).
--
-- KEYS[1] the job's record hash
--
-- Returns HGETALL of the record (empty when there is none). A script, so concurrent reads go out together in
-- one pipeline on one connection (RedisConnection.run) instead of one connection each.

return redis.call('HGETALL', KEYS[1])
