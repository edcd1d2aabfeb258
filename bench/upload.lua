-- wrk script: each request is the same OpenTera-style multipart upload of a 4 KiB file
-- (file_asset JSON, then the file), as the small-upload benchmark sends to assetd and to
-- the nginx baseline alike. Settings come from the environment (see bench/bench.py).
local boundary = "assetdbenchboundary7d3a1f"
local size = tonumber(os.getenv("BENCH_FILE_SIZE") or "4096")
local session = os.getenv("BENCH_SESSION") or "1"
local token = os.getenv("BENCH_TOKEN") or ""

local file = string.rep("a", size)
local body = "--" .. boundary .. "\r\n"
    .. "Content-Disposition: form-data; name=\"file_asset\"\r\n"
    .. "Content-Type: application/json\r\n\r\n"
    .. "{\"id_session\": " .. session .. ", \"asset_name\": \"bench.bin\"}\r\n"
    .. "--" .. boundary .. "\r\n"
    .. "Content-Disposition: form-data; name=\"file\"; filename=\"bench.bin\"\r\n"
    .. "Content-Type: application/octet-stream\r\n\r\n"
    .. file .. "\r\n"
    .. "--" .. boundary .. "--\r\n"

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
wrk.headers["Authorization"] = "OpenTera " .. token

-- Machine-readable summary for bench/bench.py. `status` counts answers other than 2xx/3xx:
-- a run with any error is refused by the harness.
function done(summary, latency, requests)
    io.write(string.format("BENCH_LATENCY p50_us=%d p90_us=%d p99_us=%d max_us=%d\n",
        latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
    io.write(string.format("BENCH_SUMMARY requests=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d\n",
        summary.requests, summary.duration, summary.errors.connect, summary.errors.read,
        summary.errors.write, summary.errors.status, summary.errors.timeout))
end
