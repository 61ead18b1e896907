-- state_record.lua: apply one StateUpdate to a job's record (RedisStateStore.record; after lib.lua).
--
-- KEYS[1] the job's record hash   KEYS[2] the queue's record index (job id -> expiry ms, +inf while not terminal)
-- ARGV[1] the update's JSON   ARGV[2] kind   ARGV[3] status   ARGV[4] terminal ("1"/"0")   ARGV[5] ttl ms ("": kept)
-- ARGV[6] at (ms)   ARGV[7] job id   ARGV[8] the job's event channel
--
-- The record hash: s (status, as the merge rule leaves it), t (terminal), c (cancel requested), r (reason),
-- q (enqueued at, ms), n (entries so far), e1..en (updates in store order), p (the running attempt's latest
-- progress, kept apart so that reports replace each other; a status update that ends the run first moves it
-- into the entries, since the merge rule keeps a run's last progress after the run). Only what JobInfo.apply
-- would keep is written, so a reader folding e1..en then p gets the merge rule's record. Returns 1 when the
-- record changed (its channel is told), 0 when the update changes nothing.
local rec, idx = KEYS[1], KEYS[2]
local entry, kind, status, terminal, ttl, at, id, channel =
    ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7], ARGV[8]

if kind == 'published' then
    redis.call('DEL', rec)  -- a new life of the id
elseif redis.call('HEXISTS', rec, 't') == 1 then
    return 0  -- a terminal record changes no more
end

if kind == 'withdrawn' then
    redis.call('DEL', rec)
    redis.call('ZREM', idx, id)
elseif kind == 'progress' then
    if redis.call('HGET', rec, 's') ~= 'running' then
        return 0
    end
    redis.call('HSET', rec, 'p', entry)
else
    if kind == 'status' and status ~= 'running' then
        local progress = redis.call('HGET', rec, 'p')
        if progress then  -- p only exists while running: the run's last report goes before the update ending it
            redis.call('HDEL', rec, 'p')
            redis.call('HSET', rec, 'e' .. redis.call('HINCRBY', rec, 'n', 1), progress)
        end
    end
    local n = redis.call('HINCRBY', rec, 'n', 1)
    redis.call('HSET', rec, 'e' .. n, entry)
    if kind == 'cancel' then
        redis.call('HSET', rec, 'c', '1')
    else
        redis.call('HSET', rec, 's', status)
        if kind == 'published' then
            redis.call('HSET', rec, 'q', at)  -- when it was enqueued, for purges
        end
        if status == 'running' then
            redis.call('HDEL', rec, 'p')  -- a new attempt reports its own progress
        end
    end
    if terminal == '1' then
        redis.call('HSET', rec, 't', '1')
        retain(rec, idx, id, ttl, at)
    else
        redis.call('ZADD', idx, '+inf', id)
    end
end
redis.call('PUBLISH', channel, kind)
return 1
