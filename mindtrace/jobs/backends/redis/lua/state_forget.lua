-- Forget records of a queue (the state store's purge and queue deletion; see mindtrace/jobs/state/redis.py).
-- KEYS: the queue's record index
-- ARGV: before (ms; "" forgets every record, else only queued ones enqueued before it), the record key
--       prefix, the event channel prefix, then job ids
-- Returns how many records were forgotten.
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
        forgotten = forgotten + redis.call('DEL', rec)
        redis.call('ZREM', idx, id)
        redis.call('PUBLISH', channel_prefix .. id, 'withdrawn')
    end
end
return forgotten
