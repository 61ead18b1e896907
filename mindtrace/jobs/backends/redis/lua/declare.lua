-- declare.lua: create a queue, or check that it exists with the same options (after lib.lua).
--
-- KEYS[1] meta
-- ARGV[1] the queue's options, as canonical JSON
--
-- Returns 1 when the queue was created or already has these options, else the options it has.

local existing = redis.call('HGET', KEYS[1], 'options')
if not existing then
  redis.call('HSET', KEYS[1], 'options', ARGV[1])
  return 1
end
if existing == ARGV[1] then
  return 1
end
return existing
