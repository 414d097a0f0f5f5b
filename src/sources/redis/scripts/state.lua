-- Where a session stands, for a licence request: read only, so a licence
-- check costs one round trip and changes nothing (an expired session is
-- buried by the next script that writes).
-- ARGV: 1 ttl_ms, 2 session_id.
-- Returns {1, now} live; {-1, now} evicted by a newer start; {0, now}
-- stopped, replaced or expired; {2, now} Redis keeps no trace of it.
local sid = ARGV[2]
local last = redis.call('ZSCORE', KEYS[1], sid)
if last then
  if last + 0 > now - ttl then
    return {1, now}
  end
  return {0, now}
end
local why = endings().ended_as(sid)
if why == 'e' then
  return {-1, now}
elseif why then
  return {0, now}
end
return {2, now}
