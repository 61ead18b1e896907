-- lib.lua: shared definitions, not a transition. RedisClient prepends this file to every other script.
--
-- now_ms() is the server's clock in milliseconds: every deadline is server time, so clients' clocks may
-- differ.
--
-- rank(priority, sequence) orders a queue: higher priority first, then FIFO.
-- rank = (MAX_PRIORITY - priority) * PRIORITY_BAND + sequence, exact in a double while below 2^53.
--
-- wake(list) leaves one wake-up token for a receiver blocked on the queue (BLPOP on its wake list).
--
-- promote(ready, delayed, leases, tokens, ranks, now) moves every message whose retry delay is over
-- (delayed score <= now) and every message whose lease expired (leases score <= now) back to the ready
-- set at its rank (kept in the ranks hash while it is away), dropping its lease token so that the old
-- holder can no longer settle it. Returns how many messages became ready.
--
-- set_deadline(leases, id, at) moves a leased message's deadline to ``at``.
--
-- retain(rec, idx, id, ttl, at) starts the retention of a job record that became terminal (state scripts),
-- and frees the unique key the job held, if it still holds it (release_key).
--
-- Unique jobs: a key string (under the queue's hash tag, named by the client) holds the id of the job that
-- published it; its record hash keeps the key's name in field k. key_holder(dkey, prefix, id) is the id of the
-- job that holds dkey, if that is not ``id`` and the job lives (its record, ``prefix`` .. its id, exists and is
-- not terminal): a holder whose record is gone (withdrawn, purged, past retention) holds nothing, so a release
-- that never ran cannot lock a key for ever. take_key(dkey, rec, id, ttl) gives dkey to ``id`` (for ``ttl`` ms;
-- "": until released). release_key(rec, id) deletes the key of record ``rec`` only while it still names ``id``:
-- after a TTL freed it, another job may hold it.
--
-- record(rec, idx, a, i) applies one StateUpdate to a job's record hash ``rec`` (index ``idx``), its three
-- arguments a[i]..a[i+2] laid out as state_record.lua describes: the one Lua form of the merge rule's effects,
-- used by state_record.lua and by the settles and publishes that write a record in the same step.
--
-- settled(done, k, j) is a settle script's answer ``done``, after it wrote the job's record when its caller
-- passed one: record hash and index at KEYS[k], KEYS[k + 1], the update's arguments from ARGV[j]. The record
-- is written whatever the settle found (as a store written just before the settle would have it), and last,
-- after the settle's removals (see below).
--
-- Every script removes before it adds: on a full server (maxmemory with noeviction) Redis refuses a script
-- whose first write is a command that may grow memory (ZADD, HSET, INCR, RPUSH), and lets it go on once it
-- has written. A removal first (ZREM, ZPOPMIN, HDEL) lets a full server still claim, settle and drain.

local MAX_PRIORITY = 9
local PRIORITY_BAND = 17592186044416 -- 2^44
-- At most this many messages are moved per call, to bound the time a script holds the server.
local PROMOTE_LIMIT = 1000

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function rank(priority, sequence)
  return (MAX_PRIORITY - tonumber(priority)) * PRIORITY_BAND + sequence
end

local function promote(ready, delayed, leases, tokens, ranks, now)
  local moved = 0
  for _, source in ipairs({ delayed, leases }) do
    local due = redis.call('ZRANGEBYSCORE', source, '-inf', now, 'LIMIT', 0, PROMOTE_LIMIT)
    for _, id in ipairs(due) do
      -- A rank can only be missing if someone edited the keys by hand: queue it last.
      local place = redis.call('HGET', ranks, id) or (MAX_PRIORITY * PRIORITY_BAND)
      redis.call('ZREM', source, id)
      redis.call('ZADD', ready, place, id)
      redis.call('HDEL', ranks, id)
      redis.call('HDEL', tokens, id)
      moved = moved + 1
    end
  end
  return moved
end

local function set_deadline(leases, id, at)
  -- ZREM first, so that a full server takes it (see above); ZADD XX alone would be refused.
  if redis.call('ZREM', leases, id) == 1 then
    redis.call('ZADD', leases, at, id)
  end
end

local function wake(list)
  -- One pending wake-up is enough: a receiver that claims and leaves messages behind passes it on.
  if redis.call('LLEN', list) == 0 then
    redis.call('RPUSH', list, '1')
  end
end

local function key_holder(dkey, prefix, id)
  local holder = redis.call('GET', dkey)
  if not holder or holder == id then
    return nil
  end
  local rec = prefix .. holder
  if redis.call('EXISTS', rec) == 1 and redis.call('HEXISTS', rec, 't') == 0 then
    return holder
  end
  return nil
end

local function take_key(dkey, rec, id, ttl)
  if ttl ~= '' then
    redis.call('SET', dkey, id, 'PX', ttl)
  else
    redis.call('SET', dkey, id)
  end
  redis.call('HSET', rec, 'k', dkey)
end

local function release_key(rec, id)
  local dkey = redis.call('HGET', rec, 'k')
  if dkey and redis.call('GET', dkey) == id then
    redis.call('DEL', dkey)
  end
end

local function retain(rec, idx, id, ttl, at)
  -- A record that became terminal at ``at`` (ms) is kept ``ttl`` ms ("" : kept), its index entry scored by
  -- its expiry; index entries of records already past retention are dropped. Its unique key is free.
  release_key(rec, id)
  if ttl ~= '' then
    redis.call('PEXPIRE', rec, ttl)
    redis.call('ZADD', idx, at + tonumber(ttl), id)
  else
    redis.call('ZADD', idx, '+inf', id)
  end
  redis.call('ZREMRANGEBYSCORE', idx, '-inf', '(' .. at)
end

local function record(rec, idx, a, i)
  -- The record hash: s (status, as the merge rule leaves it), t (terminal), c (cancel requested), r (reason),
  -- q (enqueued at, ms), x (do not start after, ms), a (attempts, as the last status update said), n (entries
  -- so far), e1..en (updates in store order), p (the running attempt's latest
  -- progress, kept apart so that reports replace each other; a status update that ends the run first moves
  -- it into the entries, since the merge rule keeps a run's last progress after the run). Only what
  -- JobInfo.apply would keep is written, so a reader folding e1..en then p gets the merge rule's record.
  -- Returns 1 when the record changed (its channel is told), 0 when nothing changed.
  local entry, channel = a[i], a[i + 2]
  local kind, status, terminal, ttl, at, attempts, not_after, id =
      string.match(a[i + 1], '^(%a+)|(%a+)|(%d)|(%d*)|(%d+)|(%d+)|(%d*)|(.*)$')
  at = tonumber(at)
  if kind == 'published' then
    redis.call('DEL', rec) -- a new life of the id
  elseif redis.call('HEXISTS', rec, 't') == 1 then
    return 0 -- a terminal record changes no more
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
      if progress then -- p only exists while running: the run's last report goes before the update ending it
        redis.call('HDEL', rec, 'p')
        redis.call('HSET', rec, 'e' .. redis.call('HINCRBY', rec, 'n', 1), progress)
      end
    end
    local n = redis.call('HINCRBY', rec, 'n', 1)
    redis.call('HSET', rec, 'e' .. n, entry)
    if kind == 'cancel' then
      redis.call('HSET', rec, 'c', '1')
    else
      redis.call('HSET', rec, 's', status, 'a', attempts)
      if kind == 'published' then
        redis.call('HSET', rec, 'q', at) -- when it was enqueued, for purges
        if not_after ~= '' then
          redis.call('HSET', rec, 'x', not_after) -- do not start after (ms): claims leave it to the consumer
        end
      end
      if status == 'running' then
        redis.call('HDEL', rec, 'p') -- a new attempt reports its own progress
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
end

local function settled(done, k, j)
  if KEYS[k] then
    record(KEYS[k], KEYS[k + 1], ARGV, j)
  end
  return done
end
