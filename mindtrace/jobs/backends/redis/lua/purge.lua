-- purge.lua: remove up to ARGV[1] ready messages (after lib.lua).
--
-- KEYS[1] meta   KEYS[2] ready   KEYS[3] delayed   KEYS[4] leases   KEYS[5] tokens   KEYS[6] ranks
-- KEYS[7] bodies   KEYS[8] deliveries
-- ARGV[1] most messages to remove
-- With records (RedisClient with its own store): KEYS[9] the queue's record index, ARGV[2] the record key
-- prefix, ARGV[3] the event channel prefix: the record of each removed job that is not terminal is forgotten
-- in the same step (it reads UNKNOWN; its channel is told; its unique key is free).
--
-- Due retries and expired leases are made ready first, then the first ARGV[1] ready messages go with their
-- bodies and delivery counts. Claimed messages and retries still waiting are kept. The client calls it until
-- a call removes fewer than ARGV[1]: each call holds the server for a bounded time.
-- Returns -1 when the queue does not exist, else the number of messages removed.

if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
promote(KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], now_ms())
local popped = redis.call('ZPOPMIN', KEYS[2], tonumber(ARGV[1]))
local ids = {}
for i = 1, #popped, 2 do
  ids[#ids + 1] = popped[i]
end
-- unpack() is bounded by the Lua stack: delete in chunks.
for i = 1, #ids, 1000 do
  local chunk = { unpack(ids, i, math.min(i + 999, #ids)) }
  redis.call('HDEL', KEYS[7], unpack(chunk))
  redis.call('HDEL', KEYS[8], unpack(chunk))
end
if KEYS[9] then
  for _, id in ipairs(ids) do
    local rec = ARGV[2] .. id
    if redis.call('HEXISTS', rec, 't') == 0 then
      release_key(rec, id)
    end
    if redis.call('HEXISTS', rec, 't') == 0 and redis.call('DEL', rec) == 1 then
      redis.call('ZREM', KEYS[9], id)
      redis.call('PUBLISH', ARGV[3] .. id, 'withdrawn')
    end
  end
end
return #ids
