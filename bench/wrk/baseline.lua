dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")
wrk.method = "GET"
wrk.path = "/v1/contents/m-0001/playback-info"
