-- claim.lua: claim up to ARGV[1] ready messages under a lease (after lib.lua).
--
-- KEYS[1] meta        KEYS[2] ready   KEYS[3] delayed   KEYS[4] leases   KEYS[5] bodies
-- KEYS[6] tokens      KEYS[7] ranks   KEYS[8] deliveries                 KEYS[9] wake
-- ARGV[1] most messages to claim   ARGV[2] lease length in ms   ARGV[3] lease token
-- ARGV[4] record key prefix ("": no records)   ARGV[5] event channel prefix   ARGV[6] the claiming worker
-- ARGV[7...] tokens of earlier claims of this client whose answer was lost (the server may have run them)
-- KEYS[10] the queue's record index (with records)
--
-- Messages still leased under one of those tokens are adopted first: leased again under ARGV[3] and
-- returned with the rest (they count towards ARGV[1]; their delivery was counted by the lost claim), so a
-- claim whose answer never came back leaves nothing leased to nobody. Finding them reads the tokens hash
-- (every claimed message): that only happens after a lost answer.
--
-- First makes due retries and expired leases ready, then pops the best-ranked messages. Each claimed
-- message gets a lease deadline (leases), the token (tokens), its rank to come back to (ranks) and one
-- more delivery (deliveries). A member this library did not write (no body) is adopted: its own bytes
-- become its body, so the consumer can dead-letter it.
--
-- With records (a RedisClient's own store), a message delivered for the first time whose record is QUEUED or
-- RETRYING (and not past its "do not start after" time) becomes RUNNING here for ARGV[6] (one more attempt
-- than the record counts), and one whose record says it was cancelled comes back marked so: the consumer
-- then neither records RUNNING nor asks for a cancel.
--
-- Returns {0} when the queue does not exist, else
-- {1, wait_ms, id_1, body_1, rank_1, deliveries_1, start_1, id_2, ...}, where wait_ms is the time until the
-- next retry delay or lease ends (-1 when there is none): how long a receiver with nothing may sleep, and
-- start is "" (nothing recorded: the consumer records the start), "r" (recorded RUNNING) or "c" followed by
-- the reason of a cancel (the job is not to run).

if redis.call('EXISTS', KEYS[1]) == 0 then
  return { 0 }
end
local now = now_ms()
local reply = { 1, -1 }
local deadline = now + tonumber(ARGV[2])
local wanted = tonumber(ARGV[1])

local records = ARGV[4] ~= ''

-- The start of a first delivery, with records: see above.
local function start(id)
  local rec = ARGV[4] .. id
  local f = redis.call('HMGET', rec, 's', 't', 'c', 'r', 'a', 'x')
  if f[1] == 'cancelled' or f[3] then
    return 'c' .. (f[4] or '')
  end
  if f[2] or (f[1] ~= 'queued' and f[1] ~= 'retrying') or (f[6] and tonumber(f[6]) <= now) then
    return '' -- the consumer decides (an expired job is settled EXPIRED unrun)
  end
  local attempts = tonumber(f[5] or '0') + 1
  local entry = cjson.encode({
    id = id, status = 'running', at = string.format('%.3f', now / 1000), attempts = tostring(attempts),
    worker = ARGV[6],
  })
  record(rec, KEYS[10], { entry, 'status|running|0||' .. now .. '|' .. attempts .. '||' .. id, ARGV[5] .. id }, 1)
  return 'r'
end

if #ARGV > 6 then
  local doubtful = {}
  for i = 7, #ARGV do
    doubtful[ARGV[i]] = true
  end
  local held = redis.call('HGETALL', KEYS[6])
  for i = 1, #held, 2 do
    local id = held[i]
    if doubtful[held[i + 1]] then
      set_deadline(KEYS[4], id, deadline)
      redis.call('HSET', KEYS[6], id, ARGV[3])
      reply[#reply + 1] = id
      reply[#reply + 1] = redis.call('HGET', KEYS[5], id) or id
      reply[#reply + 1] = redis.call('HGET', KEYS[7], id) or (MAX_PRIORITY * PRIORITY_BAND)
      reply[#reply + 1] = redis.call('HGET', KEYS[8], id) or 1
      reply[#reply + 1] = '' -- the lost claim may have recorded its start: the consumer records it again
      wanted = wanted - 1
    end
  end
end

promote(KEYS[2], KEYS[3], KEYS[4], KEYS[6], KEYS[7], now)
local popped = {}
if wanted > 0 then
  popped = redis.call('ZPOPMIN', KEYS[2], wanted)
end
for i = 1, #popped, 2 do
  local id, place = popped[i], popped[i + 1]
  local body = redis.call('HGET', KEYS[5], id)
  if not body then
    body = id
    redis.call('HSET', KEYS[5], id, body)
  end
  redis.call('ZADD', KEYS[4], deadline, id)
  redis.call('HSET', KEYS[6], id, ARGV[3])
  redis.call('HSET', KEYS[7], id, place)
  local deliveries = redis.call('HINCRBY', KEYS[8], id, 1)
  reply[#reply + 1] = id
  reply[#reply + 1] = body
  reply[#reply + 1] = place
  reply[#reply + 1] = deliveries
  reply[#reply + 1] = (records and deliveries == 1) and start(id) or ''
end

if #popped > 0 and redis.call('ZCARD', KEYS[2]) > 0 then
  wake(KEYS[9])
end

local next_at = nil
for _, key in ipairs({ KEYS[3], KEYS[4] }) do
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[2] then
    local at = tonumber(first[2])
    if next_at == nil or at < next_at then
      next_at = at
    end
  end
end
if next_at ~= nil then
  reply[2] = math.max(0, next_at - now)
end
return reply
