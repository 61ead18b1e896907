-- state_cancel.lua: cancel a job through its record (RedisStateStore.cancel; after lib.lua).
--
-- KEYS[1] the job's record hash   KEYS[2] the queue's record index   KEYS[3] the queue's cancel stream
-- ARGV[1] the CANCELLED update's JSON   ARGV[2] the cancel request's JSON   ARGV[3] ttl ms ("": kept)
-- ARGV[4] at (ms)   ARGV[5] job id   ARGV[6] reason ("": none)   ARGV[7] the job's event channel
-- ARGV[8] the queue's cancel channel
--
-- A record not yet RUNNING becomes CANCELLED here, atomically with the check, and a consumer records RUNNING
-- before it checks for a cancel: so a queued job either is cancelled before it starts or is running (and
-- hears the request on the cancel channel, or reads it when its next attempt starts).
-- Returns 'not_found', 'already_finished', 'cancelling' or 'cancelled' (CancelOutcome's values).
local rec, idx, stream = KEYS[1], KEYS[2], KEYS[3]
local cancelled, request, ttl, at, id, reason, channel, control =
    ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6], ARGV[7], ARGV[8]

local status = redis.call('HGET', rec, 's')
if not status then
    return 'not_found'
end
if redis.call('HEXISTS', rec, 't') == 1 then
    return 'already_finished'
end
local n = redis.call('HINCRBY', rec, 'n', 1)
redis.call('HSET', rec, 'r', reason)
if status == 'running' then
    redis.call('HSET', rec, 'e' .. n, request, 'c', '1')
    local sid = redis.call('XADD', stream, 'MAXLEN', '~', 10000, '*', 'id', id, 'reason', reason)
    redis.call('PUBLISH', control, sid .. '\n' .. id .. '\n' .. reason)
    redis.call('PUBLISH', channel, 'cancel')
    return 'cancelling'
end
redis.call('HSET', rec, 'e' .. n, cancelled, 's', 'cancelled', 't', '1')
retain(rec, idx, id, ttl, at)
redis.call('PUBLISH', channel, 'status')
return 'cancelled'
