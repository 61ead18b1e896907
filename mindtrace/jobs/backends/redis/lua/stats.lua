-- stats.lua: the counts of a queue and of its dead-letter queue (after lib.lua).
--
-- KEYS[1] meta   KEYS[2] ready   KEYS[3] delayed   KEYS[4] leases   KEYS[5] tokens   KEYS[6] ranks
-- KEYS[7] wake   KEYS[8] dead-letter meta   KEYS[9] dead-letter ready   KEYS[10] dead-letter delayed
-- KEYS[11] dead-letter leases   (for a dead-letter queue itself, KEYS[8..11] are empty strings)
--
-- Due retries and expired leases are made ready first, as count.lua does, so the counts match what a claim
-- would see. Returns -1 when the queue does not exist, else {ready, running, delayed, dead_lettered}:
-- ready (waiting to be claimed), running (leased), delayed (waiting for a retry delay), dead_lettered (every
-- message of the dead-letter queue: ready, leased or delayed; 0 when it does not exist).

if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
if promote(KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], now_ms()) > 0 then
  wake(KEYS[7])
end
local dead = 0
if KEYS[8] ~= '' and redis.call('EXISTS', KEYS[8]) == 1 then
  dead = redis.call('ZCARD', KEYS[9]) + redis.call('ZCARD', KEYS[10]) + redis.call('ZCARD', KEYS[11])
end
return { redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[4]), redis.call('ZCARD', KEYS[3]), dead }
