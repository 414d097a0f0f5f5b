-- Heartbeats on live sessions; BENCH_SESSIONS lines are "<token> <session id>".
dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")
local sessions
local n = 0
function init(args)
  sessions = {}
  for _, line in ipairs(lines_of("BENCH_SESSIONS")) do
    local token, id = string.match(line, "(%S+) (%S+)")
    table.insert(sessions, { token = token, id = id })
  end
end
function request()
  n = n + 1
  local s = sessions[(n % #sessions) + 1]
  return wrk.format("PUT", "/v1/playback/sessions/" .. s.id,
    { ["Authorization"] = "Bearer " .. s.token, ["Content-Type"] = "application/json" },
    '{"position_ms":' .. (n * 1000) .. ',"state":"playing"}')
end
