-- Reads the new entries of progress logs for one consumer, as
-- `XREADGROUP GROUP ARGV[1] ARGV[2] COUNT ARGV[3] STREAMS KEYS... > ...`
-- would, and answers them packed into one string.
-- KEYS: progress log streams (on a cluster, one: a script's keys share a slot)
-- ARGV[1] consumer group, ARGV[2] consumer, ARGV[3] entries per stream at most
--
-- Why a script: a round reads hundreds of entries, and XREADGROUP answers
-- five values for each (the entry, its id, its fields, a field, a value).
-- Decoding values one by one was the largest part of what the courier cost
-- per heartbeat; one string of the same bytes is decoded at once.
--
-- The string is a sequence of parts, each `<byte length>:<bytes>`, so any
-- byte may appear in a part: per stream its name and its entry count, per
-- entry its id, the number of field and value parts, then those parts.
-- Nothing new anywhere answers an empty string (a Lua false would reach a
-- RESP3 client as a boolean); an error (NOGROUP) answers as itself.
local args = {'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS'}
for i = 1, #KEYS do args[#args + 1] = KEYS[i] end
for _ = 1, #KEYS do args[#args + 1] = '>' end
local streams = redis.pcall('XREADGROUP', unpack(args))
if type(streams) == 'table' and streams.err then
  return streams
end
if not streams then
  return ''
end

local out = {}
local function put(s)
  out[#out + 1] = #s .. ':' .. s
end
for _, stream in ipairs(streams) do
  local entries = stream[2]
  put(stream[1])
  put(tostring(#entries))
  for _, entry in ipairs(entries) do
    local fields = entry[2] or {}
    put(entry[1])
    put(tostring(#fields))
    for _, part in ipairs(fields) do
      put(part)
    end
  end
end
return table.concat(out)
