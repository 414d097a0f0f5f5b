-- The user's live sessions by Redis' own clock.
-- KEYS[1] sessions zset, KEYS[2] session info hash
-- ARGV: ttl_ms
-- Returns {now_ms, id1, last_heartbeat1, info1, ...}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local result = {now}
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. (now - tonumber(ARGV[1])), '+inf', 'WITHSCORES')
for i = 1, #live, 2 do
  table.insert(result, live[i])
  table.insert(result, live[i + 1])
  table.insert(result, redis.call('HGET', KEYS[2], live[i]) or '')
end
return result
