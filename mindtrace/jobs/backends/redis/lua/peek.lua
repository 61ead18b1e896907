-- peek.lua: read the first ready messages without claiming them (after lib.lua).
--
-- KEYS[1] meta   KEYS[2] ready   KEYS[3] bodies
-- ARGV[1] most messages to read
--
-- Read only: nothing is promoted, claimed or moved. Returns -1 when the queue does not exist, else the bodies
-- of the first ARGV[1] ready messages in rank order (the order claims take them).

if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
local ids = redis.call('ZRANGE', KEYS[2], 0, tonumber(ARGV[1]) - 1)
local bodies = {}
for _, id in ipairs(ids) do
  local body = redis.call('HGET', KEYS[3], id)
  if body then
    bodies[#bodies + 1] = body
  end
end
return bodies
