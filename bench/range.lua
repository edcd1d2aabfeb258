-- wrk script: 1 MiB slices at random slice-aligned offsets of the large file, as a
-- resuming or seeking client asks for them (GET with one Range). The same requests go
-- to assetd (through nginx, X-Accel-Redirect) and to nginx serving the file statically.
-- Settings come from the environment (see bench/bench.py).
local size = tonumber(os.getenv("BENCH_FILE_SIZE"))
local slice = 1024 * 1024
local token = os.getenv("BENCH_TOKEN") or ""
local slices = math.floor(size / slice)

function setup(thread)
    thread:set("seed", math.random(1, 1000000))
end

function init(args)
    math.randomseed(seed or os.time())
end

function request()
    local start = math.random(0, slices - 1) * slice
    local headers = { ["Range"] = string.format("bytes=%d-%d", start, start + slice - 1) }
    if token ~= "" then
        headers["Authorization"] = "Bearer " .. token
    end
    return wrk.format("GET", nil, headers)
end

-- No response() callback: it would hand every 1 MiB body to Lua, and the copying would
-- cost more than the servers measured. bench.py checks a slice's answer (206, 1 MiB)
-- on each side before the run; wrk counts answers >= 400 as errors.
function done(summary, latency, requests)
    io.write(string.format("BENCH_LATENCY p50_us=%d p90_us=%d p99_us=%d max_us=%d\n",
        latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
    io.write(string.format("BENCH_SUMMARY requests=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d\n",
        summary.requests, summary.duration, summary.errors.connect, summary.errors.read,
        summary.errors.write, summary.errors.status, summary.errors.timeout))
end
