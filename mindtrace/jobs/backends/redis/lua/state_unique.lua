-- state_unique.lua: record a unique job's publish unless its key is held (RedisStateStore.record_unique, for
-- another broker's publish; after lib.lua).
--
-- KEYS[1] the job's record hash   KEYS[2] the queue's record index
-- ARGV[1..3] the QUEUED (or SCHEDULED) update, as state_record.lua takes it   ARGV[4] the unique key's name
-- (under the queue's hash tag)   ARGV[5] its ttl (ms; "": until the job ends)   ARGV[6] the prefix of the
-- queue's record keys   ARGV[7] the job id
--
-- The check and the taking are one step, so of concurrent publishes of one key exactly one records its job
-- (and is told to publish it). Returns the id of the live job holding the key (nothing written), or "" when
-- this job was recorded and holds it.
local holder = key_holder(ARGV[4], ARGV[6], ARGV[7])
if holder then
  return holder
end
record(KEYS[1], KEYS[2], ARGV, 1)
take_key(ARGV[4], KEYS[1], ARGV[7], ARGV[5])
return ''
