-- Shared by every scenario: one machine-readable line for scripts/bench.
function done(summary, latency, requests)
  local errors = summary.errors
  local non2xx = errors.status
  io.write(string.format("RESULT rps=%.1f p50_ms=%.3f p99_ms=%.3f requests=%d non2xx=%d socket_errors=%d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.requests, non2xx, errors.connect + errors.read + errors.write + errors.timeout))
end

-- Lines of a file named by an environment variable.
function lines_of(var)
  local out = {}
  local f = assert(io.open(assert(os.getenv(var), var .. " is not set"), "r"))
  for line in f:lines() do table.insert(out, line) end
  f:close()
  return out
end
