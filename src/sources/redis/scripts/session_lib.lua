-- Shared by the session scripts (prepended to each). Every session script
-- takes the same first keys: KEYS[1] sessions (zset: session id -> last
-- heartbeat ms, live or expired and not yet buried), KEYS[2] session info
-- (hash: session id -> "device_id content_id"), KEYS[3] devices (hash:
-- device id -> its session id), KEYS[4] ended (zset: "e:<id>" evicted or
-- "s:<id>" stopped, replaced or expired -> when it was issued; and runs of
-- such ids forgotten, "~e<ms>" / "~s<ms>" -> minus the latest issue time
-- each covers; see `bury`).
-- Every session script takes the session TTL in ms as ARGV[1].
-- Liveness is judged by Redis' own clock, so instances with skewed clocks agree.
-- `now` in ms, and now_s, the same as the string the writes carry: it is cut
-- from TIME's own digits (seconds, then the microseconds' thousands), since
-- Lua turns a number into a string through sprintf, and Redis a number
-- argument too: two concatenations and a ZADD score were ~10 % of a
-- heartbeat script's instructions in Redis.
local t = redis.call('TIME')
local now_s = t[1] .. string.sub('00000' .. t[2], -6, -4)
-- Numbers are read from strings by arithmetic (`s + 0`): one strtod, where
-- tonumber makes two. strtod was 7 % of a heartbeat script's instructions in
-- Redis, and each argument a script takes costs it a string and table room.
local now = now_s + 0

-- How long a resume position lives after its last write, in s. Moneta's
-- other writers of the positions hash (remember.lua, the write-back of a
-- position read from the internal API) pass the same value from Rust
-- (`POSITION_TTL_S`; a unit test keeps the two equal), since
-- keep_keys_if_low relies on no writer giving the hash more.
local POSITION_TTL_S = 2592000

-- Sessions stop counting after this long without a heartbeat.
local ttl = ARGV[1] + 0

-- How long the user's session keys outlive their last write, in ms: ended
-- ids stay ended (a stray heartbeat is not recorded again) for at least an
-- hour, and a session outlives its own TTL.
local key_lifetime = math.max(2 * ttl, 3600000)

-- Ended sessions remembered one by one per user: this many, and a start
-- keeps its limit plus this many. Beyond that the earliest issued are
-- forgotten one by one but not as a whole: see `bury`.
local ENDED_KEEP = 16
-- Runs of forgotten ended ids of one kind kept per user (see `bury`).
local MAX_RUNS = 32

-- When Moneta issued a session, on its estimate of Redis' clock, in ms: the
-- id's random part is a UUIDv7 (`sessions/ids.rs`), whose first 48 bits are
-- that time. nil for ids issued before ids carried it (version 4).
local function issued(sid)
  if string.sub(sid, 13, 13) ~= '7' then
    return nil
  end
  return tonumber(string.sub(sid, 1, 12), 16)
end

-- What ends sessions, made only by the paths that end, bury or refuse: a
-- `local function` statement makes a closure on every run of a script, and
-- the heartbeat's common path needs none of these (five closures and their
-- upvalues were 2 % of its instructions in Redis).
local function endings()
  local function forget(sid)
    local info = redis.call('HGET', KEYS[2], sid)
    local dev = info and string.match(info, '^(%S+)')
    if dev and redis.call('HGET', KEYS[3], dev) == sid then
      redis.call('HDEL', KEYS[3], dev)
    end
    redis.call('ZREM', KEYS[1], sid)
    redis.call('HDEL', KEYS[2], sid)
  end

  -- The run of forgotten ids that covers issue time `at`: its member and
  -- kind, or nil past every run. Runs rank below every id (negative scores),
  -- the latest first.
  local function run_at(at)
    local run = redis.call('ZREVRANGEBYSCORE', KEYS[4], -at, '-inf', 'LIMIT', 0, 1)[1]
    if run then
      return run, string.sub(run, 2, 2)
    end
    return nil
  end

  -- Records that the id of kind `why` issued at `at` is forgotten. Ids are
  -- forgotten mostly in the order they were issued, so the latest run grows;
  -- one that ended late (a long session) and lands inside a run of the
  -- other kind splits it. Beyond MAX_RUNS the earliest run joins the next:
  -- ids forgotten that long ago stay ended, only their kind may be lost.
  local function cover(why, at)
    local run, kind = run_at(at)
    if kind == 'x' then
      -- Issued before Redis knew of any ending, and ended since: the time
      -- Redis knows nothing of ends before this id.
      redis.call('ZREM', KEYS[4], run)
      redis.call('ZADD', KEYS[4], -(at - 1), '~x' .. (at - 1))
      redis.call('ZADD', KEYS[4], -at, '~' .. why .. at)
    elseif run then
      if kind ~= why then
        redis.call('ZADD', KEYS[4], -(at - 1), '~' .. kind .. (at - 1))
        redis.call('ZADD', KEYS[4], -at, '~' .. why .. at)
      end
    else
      local latest = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
      if latest[2] and latest[2] + 0 < 0 and string.sub(latest[1], 2, 2) == why then
        redis.call('ZREM', KEYS[4], latest[1])
      end
      redis.call('ZADD', KEYS[4], -at, '~' .. why .. at)
    end
    local runs = redis.call('ZCOUNT', KEYS[4], '-inf', '(0')
    if runs > MAX_RUNS then
      redis.call('ZREMRANGEBYRANK', KEYS[4], MAX_RUNS, runs - 1)
    end
  end

  -- Remembers that a session ended ('e' evicted, 's' otherwise) so that its id
  -- is never recorded again. The last `keep` ids are kept one by one, by when
  -- they were issued (never later than now: an instance's clock can run
  -- ahead); the earliest issued beyond them are forgotten into runs: members
  -- '~<kind><latest issue time>' scored minus that time, each covering the
  -- forgotten ids issued after the previous run's time and up to its own,
  -- all of its kind. An id issued no later than the latest run and unknown
  -- to the sessions key has ended (a session issued earlier and still
  -- playing is in the sessions key), and the run covering it tells how: a
  -- stopped session stays `404` after many evictions, an evicted one `409`.
  -- So what a user's endings leave is bounded, and every ended session
  -- stays ended. Some paths bury and return without keeping the keys (an
  -- expired session's heartbeat, a refusal), and the first burial creates
  -- the key: it gets its lifetime here, or it would outlive a user who never
  -- comes back.
  local function bury(sid, why, keep)
    if redis.call('EXISTS', KEYS[4]) == 0 then
      -- Redis knows of no ending before now (a new user, or Redis lost its
      -- data): the earliest run, of kind 'x', says that ids issued before
      -- now are not judged by the runs that follow. A session Redis lost is
      -- then recorded again by its heartbeat, however many end first.
      redis.call('ZADD', KEYS[4], -now, '~x' .. now)
    end
    redis.call('ZADD', KEYS[4], math.min(issued(sid) or now, now), why .. ':' .. sid)
    local runs = redis.call('ZCOUNT', KEYS[4], '-inf', '(0')
    local forgotten = redis.call('ZRANGE', KEYS[4], runs, -(keep + 1), 'WITHSCORES')
    for i = 1, #forgotten, 2 do
      local member = forgotten[i]
      if issued(string.sub(member, 3)) then
        cover(string.sub(member, 1, 1), forgotten[i + 1] + 0)
      end
      redis.call('ZREM', KEYS[4], member)
    end
    redis.call('PEXPIRE', KEYS[4], 2 * key_lifetime)
  end

  -- 'e', 's' or nil (Redis keeps no trace of it, or none from before it
  -- was issued).
  local function ended_as(sid)
    if redis.call('ZSCORE', KEYS[4], 'e:' .. sid) then
      return 'e'
    end
    if redis.call('ZSCORE', KEYS[4], 's:' .. sid) then
      return 's'
    end
    local at = issued(sid)
    if not at then
      return nil
    end
    local _, kind = run_at(at)
    if kind == 'x' then
      return nil
    end
    return kind
  end

  -- Sessions without a heartbeat for ttl stop counting, and stay ended.
  local function bury_expired(keep)
    for _, sid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - ttl)) do
      forget(sid)
      bury(sid, 's', keep)
    end
  end

  -- {code, now, id1, info1, ...}: the user's sessions, for a refusal.
  local function refusal(code)
    local result = {code, now}
    for _, sid in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
      table.insert(result, sid)
      table.insert(result, redis.call('HGET', KEYS[2], sid) or '')
    end
    return result
  end

  return {
    forget = forget,
    bury = bury,
    ended_as = ended_as,
    bury_expired = bury_expired,
    refusal = refusal,
  }
end

-- The session keys live while the user plays, and at least key_lifetime
-- after that, so that ended ids stay ended. They are given twice that, all
-- four at once; a start or a stop renews them on every call, a heartbeat
-- when they run low (keep_keys_if_low) or when it records a session again.
-- The other keys never expire before the sessions key: they are renewed
-- with it, and a key created later gets its lifetime as it is created.
local function keep_keys()
  for i = 1, 4 do
    redis.call('PEXPIRE', KEYS[i], 2 * key_lifetime)
  end
end

-- The positions hash (KEYS[5]) lives at least POSITION_TTL_S after its last
-- write. The session scripts renew it only together with the session keys
-- (keep_keys in the same call), giving it that plus twice the key lifetime.
local function keep_positions()
  redis.call('PEXPIRE', KEYS[5], POSITION_TTL_S * 1000 + 2 * key_lifetime)
end

-- A heartbeat renews the session keys and the positions hash only once the
-- hash has less than POSITION_TTL_S + key_lifetime left: one PTTL on nearly
-- every heartbeat instead of four PEXPIREs and an EXPIRE, which were a fifth
-- of the script's instructions in Redis. That one reading answers for the
-- session keys too: the hash's time beyond POSITION_TTL_S never exceeds what
-- the sessions key has left, since only keep_positions gives it more (with
-- keep_keys, both at once; the clocks then run together), starts renew the
-- session keys alone, and the hash's other writers (the write-back of a
-- position read from the internal API, remember.lua) give it POSITION_TTL_S
-- alone. So with no renewal the session keys keep at least key_lifetime and
-- the hash at least POSITION_TTL_S (a sessions key emptied by a stop is
-- created again only by a start or by a heartbeat's recording again, both
-- of which renew it). Called after the hash is written: a hash the write
-- created has no lifetime yet (PTTL -1) and gets one here.
local function keep_keys_if_low()
  if redis.call('PTTL', KEYS[5]) < POSITION_TTL_S * 1000 + key_lifetime then
    keep_keys()
    keep_positions()
  end
end

-- The resume position ('<ms>[:c]@<now>') and the progress-log entry that
-- carries it to the internal API (KEYS[6], the log of the user's bucket: the
-- same hash tag, so Redis Cluster runs this in one slot too), in the same
-- atomic step. The entry is one field, 'i' = '<position> <now> <completed>
-- <content> <user>' (the user last: it may hold spaces), because the courier
-- reads every entry back and each field costs it a reply value to parse.
local function record_position(user, content, position, completed)
  local value = position
  if completed == '1' then
    value = value .. ':c'
  end
  redis.call('HSET', KEYS[5], content, value .. '@' .. now_s)
  redis.call('XADD', KEYS[6], '*', 'i', position .. ' ' .. now_s .. ' ' .. completed .. ' ' .. content .. ' ' .. user)
end

