-- schedule_cursor.lua: move a schedule's cursor (the last fire time handled, ms) without a fire (after lib.lua).
--
-- KEYS[1] the queue's schedule cursors (hash: schedule name -> ms)
-- ARGV[1] the schedule's name   ARGV[2] mode   ARGV[3] ms   ARGV[4] the expected cursor (mode "cas")
-- Modes: "cas" moves it from ARGV[4] ("": it has none) to ARGV[3]; "at_least" raises it to ARGV[3] at least (a
-- new or changed schedule: no fire from before it is owed), creating it if missing. Returns 1 when it moved.

local current = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] == 'cas' then
  if (current or '') ~= ARGV[4] then
    return 0
  end
elseif current and tonumber(current) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
