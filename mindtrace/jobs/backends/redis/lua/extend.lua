-- extend.lua: push a lease's deadline to now + ARGV[3] ms, if the caller still holds it (after lib.lua).
--
-- KEYS[1] leases   KEYS[2] tokens
-- ARGV[1] message id   ARGV[2] lease token   ARGV[3] lease length in ms
--
-- Returns 1 when extended, -1 when the lease was lost.

if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then
  return -1
end
set_deadline(KEYS[1], ARGV[1], now_ms() + tonumber(ARGV[3]))
return 1
