-- state_forget.lua: forget records of a queue (RedisStateStore purges and queue deletions; after lib.lua).
--
-- KEYS[1] the queue's record index
-- ARGV[1] before (ms; "" forgets every record given, else only queued ones enqueued before it)
-- ARGV[2] the record key prefix   ARGV[3] the event channel prefix   ARGV[4..] job ids
--
-- Returns how many records were forgotten (each one's channel is told); their jobs' unique keys are free.
local idx = KEYS[1]
local before, key_prefix, channel_prefix = ARGV[1], ARGV[2], ARGV[3]
local limit = before ~= '' and tonumber(before) or nil
local forgotten = 0
for i = 4, #ARGV do
    local id = ARGV[i]
    local rec = key_prefix .. id
    local forget = true
    if limit then
        local fields = redis.call('HMGET', rec, 's', 'q')
        forget = fields[1] == 'queued' and tonumber(fields[2] or '0') <= limit
    end
    if forget then
        release_key(rec, id)
        forgotten = forgotten + redis.call('DEL', rec)
        redis.call('ZREM', idx, id)
        redis.call('PUBLISH', channel_prefix .. id, 'withdrawn')
    end
end
return forgotten
