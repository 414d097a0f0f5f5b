-- playback-info as players send it again and again for what each viewer is
-- watching: user i % users always asks for title user % titles. What Moneta's
-- client-side cache holds (entitlements, and positions of a few titles per
-- user) answers these without Redis; compare with playback_info.lua, which
-- walks every user × title pair and so mostly misses that cache.
dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")
dofile(os.getenv("BENCH_LUA_DIR") .. "/pairs.lua")
function request()
  local user = i % #tokens
  i = i + 1
  return wrk.format("GET", "/v1/contents/" .. titles[(user % #titles) + 1] .. "/playback-info",
    { ["Authorization"] = "Bearer " .. tokens[user + 1] })
end
