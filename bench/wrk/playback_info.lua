-- playback-info with a warm cache, one of many users per request.
dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")
local tokens
local n = 0
function init(args)
  tokens = lines_of("BENCH_TOKENS")
end
function request()
  n = n + 1
  local token = tokens[(n % #tokens) + 1]
  return wrk.format("GET", "/v1/contents/m-0001/playback-info", { ["Authorization"] = "Bearer " .. token })
end
