-- Shared by the playback-info scenarios: tokens in user order, title ids,
-- and a per-thread starting point `i` so short runs do not always replay the
-- same first requests. A scenario defines `request()` on top.
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
tokens, titles, i = nil, nil, 0
function init(args)
  tokens = lines_of("BENCH_TOKENS")
  titles = lines_of("BENCH_TITLE_IDS")
  math.randomseed(os.time() * 16 + tid)
  i = math.random(0, #tokens * #titles - 1)
end
