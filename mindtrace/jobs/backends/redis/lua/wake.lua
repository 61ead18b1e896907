-- wake.lua: leave a wake-up token for a blocked receiver, if the queue still exists (after lib.lua).
--
-- KEYS[1] meta   KEYS[2] wake
--
-- Used to pass on a token that a cancelled or abandoned blocking read may have taken. The existence check
-- keeps a late pass-on from re-creating a key of a deleted queue.
-- Returns 1 when the queue exists, else 0.

if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
wake(KEYS[2])
return 1
