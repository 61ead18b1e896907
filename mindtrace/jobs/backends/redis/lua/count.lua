-- count.lua: how many messages are ready (after lib.lua).
--
-- KEYS[1] meta   KEYS[2] ready   KEYS[3] delayed   KEYS[4] leases   KEYS[5] tokens   KEYS[6] ranks
-- KEYS[7] wake
--
-- Due retries and expired leases are made ready first, so the count matches what a claim would see.
-- Returns -1 when the queue does not exist, else the number of ready messages.

if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
if promote(KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], now_ms()) > 0 then
  wake(KEYS[7])
end
return redis.call('ZCARD', KEYS[2])
