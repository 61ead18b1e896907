-- publish.lua: queue one or more messages, at once or after a delay (after lib.lua).
--
-- KEYS[1] meta   KEYS[2] sequence   KEYS[3] ready   KEYS[4] bodies   KEYS[5] wake   KEYS[6] delayed   KEYS[7] ranks
-- ARGV[1] priority_1   ARGV[2] id_1   ARGV[3] body_1   ARGV[4] delay_1 (ms; 0: ready at once)   ARGV[5] priority_2 ...
-- With records (RedisClient with its own store): KEYS[8] the queue's record index, KEYS[8 + i] message i's
-- record hash, and each message's four arguments followed by its QUEUED (or SCHEDULED) update's three
-- (state_record.lua), then three for a unique job (lib.lua): its key's name ("" : not unique), the key's ttl
-- (ms; "": until the job ends), and the prefix of the queue's record keys. The key is under the queue's hash
-- tag, like every key the script names.
--
-- The message id is the job id; each message is ranked by priority, then the next sequence number. A delayed
-- message waits in the delayed set, scored by the server's clock, with its rank kept aside as a retry's is;
-- promote() in lib.lua makes it ready when due. A job id already in the queue (ready, claimed or delayed: it
-- has a body) is not queued again, so a publish that the driver sent twice (its answer timed out) queues each
-- job once, and records it once. A unique job whose key a live job holds is not queued either, nor recorded.
-- Either way a blocked receiver is woken, to claim or to learn when to look again.
-- Returns -1 when the queue does not exist (nothing is queued), else the number of messages queued; with
-- records, a table of that number then, per message, the id of the job holding its key when that kept it out
-- ("" otherwise).

if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
local stride = KEYS[8] and 10 or 4
local count = #ARGV / stride
local first = redis.call('INCRBY', KEYS[2], count) - count
local queued = 0
local holders = {}
local now = nil
for i = 1, count do
  local at = stride * (i - 1)
  local id = ARGV[at + 2]
  local dkey = stride == 10 and ARGV[at + 8] or ''
  local holder = dkey ~= '' and key_holder(dkey, ARGV[at + 10], id) or nil
  holders[i] = holder or ''
  if not holder and redis.call('HSETNX', KEYS[4], id, ARGV[at + 3]) == 1 then
    local place = rank(ARGV[at + 1], first + i)
    local delay = tonumber(ARGV[at + 4])
    if delay > 0 then
      now = now or now_ms()
      redis.call('HSET', KEYS[7], id, string.format('%d', place))
      redis.call('ZADD', KEYS[6], now + delay, id)
    else
      redis.call('ZADD', KEYS[3], place, id)
    end
    if stride == 10 then
      record(KEYS[8 + i], KEYS[8], ARGV, at + 5)
      if dkey ~= '' then
        take_key(dkey, KEYS[8 + i], id, ARGV[at + 9])
      end
    end
    queued = queued + 1
  end
end
if queued > 0 then
  wake(KEYS[5])
end
if stride == 10 then
  table.insert(holders, 1, queued)
  return holders
end
return queued
