-- purge.lua: remove every ready message (after lib.lua).
--
-- KEYS[1] meta   KEYS[2] ready   KEYS[3] delayed   KEYS[4] leases   KEYS[5] tokens   KEYS[6] ranks
-- KEYS[7] bodies   KEYS[8] deliveries
--
-- Due retries and expired leases are made ready first, then every ready message goes with its body and
-- delivery count. Claimed messages and retries still waiting are kept.
-- Returns -1 when the queue does not exist, else the number of messages removed.

if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
promote(KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], now_ms())
local ids = redis.call('ZRANGE', KEYS[2], 0, -1)
-- unpack() is bounded by the Lua stack: delete in chunks.
for i = 1, #ids, 1000 do
  local chunk = { unpack(ids, i, math.min(i + 999, #ids)) }
  redis.call('HDEL', KEYS[7], unpack(chunk))
  redis.call('HDEL', KEYS[8], unpack(chunk))
end
redis.call('DEL', KEYS[2])
return #ids
