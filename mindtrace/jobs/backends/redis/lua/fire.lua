-- fire.lua: one fire of a schedule: move its cursor from the expected fire time and queue the fire's job, in one
-- atomic step (after lib.lua; publish.lua's body follows this header when the script is loaded).
--
-- KEYS[1] .. KEYS[n - 1]: publish.lua's keys (KEYS[1] the queue's meta), KEYS[n] the queue's schedule cursors
-- (hash: schedule name -> last fire time handled, ms).
-- ARGV: publish.lua's arguments for one message, then the schedule's name, the expected cursor and the new one.
-- Returns -2 when the cursor is not the expected one (another process fired this time, or the schedule is gone:
-- nothing is queued), -1 when the queue does not exist (nor is the cursor moved), else publish.lua's answer.

local cursors = table.remove(KEYS)
local moved_to = table.remove(ARGV)
local expected = table.remove(ARGV)
local schedule = table.remove(ARGV)
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
if redis.call('HGET', cursors, schedule) ~= expected then
  return -2
end
redis.call('HSET', cursors, schedule, moved_to)
