-- playback-info with a warm cache over every user × title pair. Request i is
-- user i % users asking for title (i / users) % titles, users fastest: the
-- order the one-RTT baseline reads Redis in. Each thread starts at a random
-- point of that cycle, so short runs do not always replay its first titles.
-- BENCH_TOKENS: one token per user, in user order; BENCH_TITLE_IDS: title ids.
-- The baselines get the same requests, so they parse the same bytes.
dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")
dofile(os.getenv("BENCH_LUA_DIR") .. "/pairs.lua")
function request()
  local user = i % #tokens
  local title = math.floor(i / #tokens) % #titles
  i = i + 1
  return wrk.format("GET", "/v1/contents/" .. titles[title + 1] .. "/playback-info",
    { ["Authorization"] = "Bearer " .. tokens[user + 1] })
end
