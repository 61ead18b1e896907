-- release.lua: give a claimed message back, ready at once at its old place (after lib.lua).
--
-- KEYS[1] ready   KEYS[2] leases   KEYS[3] tokens   KEYS[4] ranks   KEYS[5] deliveries   KEYS[6] wake
-- ARGV[1] message id   ARGV[2] lease token
-- KEYS[7] KEYS[8] ARGV[3..5] (optional) the job's record hash, index and update, as for state_record.lua; or,
-- with ARGV[3] "" and ARGV[4] the job's event channel, the start its claim recorded is undone (a message
-- given back unrun from a receiver's buffer): a RUNNING record is QUEUED again, one attempt fewer.
--
-- The claim it is released from does not count as a delivery: the count goes back by one.
-- Returns 1 when released, -1 when the lease was lost (the message is back or elsewhere already).

local function unstart()
  local f = redis.call('HMGET', KEYS[7], 's', 'a')
  if f[1] == 'running' then
    local attempts = math.max(0, tonumber(f[2] or '1') - 1)
    local now = now_ms()
    local entry = cjson.encode({
      id = ARGV[1], status = 'queued', at = string.format('%.3f', now / 1000), attempts = tostring(attempts),
    })
    record(KEYS[7], KEYS[8], { entry, 'status|queued|0||' .. now .. '|' .. attempts .. '||' .. ARGV[1], ARGV[4] }, 1)
  end
  return 1
end

if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[2] then
  return (KEYS[7] and ARGV[3] == '') and -1 or settled(-1, 7, 3)
end
local place = redis.call('HGET', KEYS[4], ARGV[1]) or (MAX_PRIORITY * PRIORITY_BAND)
redis.call('ZREM', KEYS[2], ARGV[1]) -- a removal first: a full server still takes the script (lib.lua)
redis.call('ZADD', KEYS[1], place, ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('HINCRBY', KEYS[5], ARGV[1], -1)
wake(KEYS[6])
if KEYS[7] and ARGV[3] == '' then
  return unstart()
end
return settled(1, 7, 3)
