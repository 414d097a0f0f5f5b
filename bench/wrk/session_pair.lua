-- Session start followed by its stop. The responses of a thread's connections
-- interleave, so one user (with a high stream limit) owns every session and
-- any pending id can be stopped with the same token.
dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")
local token = assert(os.getenv("BENCH_PAIR_TOKEN"), "BENCH_PAIR_TOKEN is not set")
local n = 0
local pending = {}
-- Device ids must differ across threads too, or one thread's start would
-- replace another's session (same device) and its stop would find nothing.
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function request()
  local stop = table.remove(pending)
  if stop then
    return wrk.format("DELETE", "/v1/playback/sessions/" .. stop, { ["Authorization"] = "Bearer " .. token })
  end
  n = n + 1
  return wrk.format("POST", "/v1/playback/sessions",
    { ["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json" },
    '{"content_id":"m-0001","device_id":"bench-' .. tid .. '-' .. n .. '"}')
end
function response(status, headers, body)
  if status == 201 then
    local id = string.match(body, '"session_id":"([^"]+)"')
    if id then table.insert(pending, id) end
  end
end
