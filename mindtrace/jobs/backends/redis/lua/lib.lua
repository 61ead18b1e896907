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
-- retain(rec, idx, id, ttl, at) starts the retention of a job record that became terminal (state scripts).
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

local function retain(rec, idx, id, ttl, at)
  -- A record that became terminal at ``at`` (ms) is kept ``ttl`` ms ("" : kept), its index entry scored by
  -- its expiry; index entries of records already past retention are dropped.
  if ttl ~= '' then
    redis.call('PEXPIRE', rec, ttl)
    redis.call('ZADD', idx, at + tonumber(ttl), id)
  else
    redis.call('ZADD', idx, '+inf', id)
  end
  redis.call('ZREMRANGEBYSCORE', idx, '-inf', '(' .. at)
end
