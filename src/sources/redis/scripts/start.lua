-- Starts a playback session unless the user is at the concurrent-stream limit.
-- Atomic: Redis runs the whole script before any other command on these keys,
-- so simultaneous starts by one user never exceed the limit.
-- ARGV: 1 ttl_ms, 2 max_streams, 3 session_id, 4 device_id, 5 content_id,
-- 6 evict_oldest ('1' or '0'), 7 deadline (Redis ms after which the caller
-- no longer waits, or '').
-- Returns {1, now_ms, evicted id, ...} when started (oldest evicted first),
-- else {0, now_ms, id1, info1, id2, info2, ...} (the live sessions); a refusal
-- changes nothing but burying sessions that were no longer live. {4, now_ms}:
-- too late, nothing changed. The caller answered without Redis and gave the
-- player an id of its own (a paused Redis runs queued scripts late); the
-- player's heartbeat records it.
if ARGV[7] ~= '' and now > ARGV[7] + 0 then
  return {4, now}
end
local max = ARGV[2] + 0
local id, device, content = ARGV[3], ARGV[4], ARGV[5]
local keep = max + ENDED_KEEP
local ending = endings()

ending.bury_expired(keep)

-- The same device starting again replaces its old session: it does not count.
local previous = redis.call('HGET', KEYS[3], device)
if previous and not redis.call('ZSCORE', KEYS[1], previous) then
  previous = nil
end
local live = redis.call('ZCARD', KEYS[1])
if previous then
  live = live - 1
end

local result = {1, now}
if live >= max then
  if ARGV[6] ~= '1' or max < 1 then
    return ending.refusal(0)
  end
  -- evict_oldest: the sessions with the oldest heartbeats make room, as many
  -- as it takes (several after a plan downgrade).
  for _, sid in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    if live < max then
      break
    end
    if sid ~= previous then
      ending.forget(sid)
      ending.bury(sid, 'e', keep)
      table.insert(result, sid)
      live = live - 1
    end
  end
end

if previous then
  ending.forget(previous)
  ending.bury(previous, 's', keep)
end
redis.call('ZADD', KEYS[1], now_s, id)
redis.call('HSET', KEYS[2], id, device .. ' ' .. content)
redis.call('HSET', KEYS[3], device, id)
keep_keys()
return result
