#!/usr/bin/env python3
"""scripts/bench: assetd against nginx doing the same transfer, in the same run.

Started by scripts/bench (which installs the tools and builds the release binary). Uses
only the standard library. Everything runs on 127.0.0.1; every load loop is bounded in
time and count; every child process is stopped on exit.

What it starts, all under a work directory it owns (default /var/tmp/assetd-bench):
  - a database of its own (dropped and created) on the local PostgreSQL;
  - two assetd processes on one database and data directory: `accel`, which hands plain
    downloads to nginx with X-Accel-Redirect, and `plain`, which streams them itself;
  - two nginx instances from the shipped nginx/assetd.conf, unchanged, one in front of
    each assetd (the "X-Accel" and "proxied" modes);
  - one baseline nginx (bench/nginx-baseline.conf): static files, bodies written to a
    file, multipart POSTs answered with 200, and the source files of imports;
  - for the import row only, a third assetd (`jobs`) that runs the relay and the job
    workers, on a RabbitMQ prefix of the bench's own; the other two run neither;
  - for the opentera row only, an assetd in OpenTera mode on a database of its own
    (`<database>_ot`), a private redis-server holding OpenTera's keys, a TeraServer
    stand-in (bench/teraserver_standin.py) and an nginx configured as OpenTera's
    (bench/nginx-opentera.conf); all stopped after the row.

Each comparison alternates target and baseline (A B A B ...), `--rounds` times, and
reports medians with min-max and the ratio of the medians (assetd / nginx, higher is
better for throughput).
"""

import argparse
import base64
import datetime
import glob
import hashlib
import hmac
import http.client
import json
import os
import platform
import re
import secrets
import shutil
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(ROOT, "bench")

ASSETD_ACCEL_PORT = 4142
ASSETD_PLAIN_PORT = 4143
NGINX_ACCEL_PORT = 4180
NGINX_PLAIN_PORT = 4181
NGINX_BASELINE_PORT = 4190
ASSETD_JOBS_PORT = 4144
ASSETD_S3_PORT = 4145
# The opentera row: assetd in OpenTera mode, and nginx configured as OpenTera's in front.
ASSETD_OT_PORT = 4146
NGINX_OT_PORT = 4182
# The S3 row's bucket, in the moto server scripts/bench starts (ASSETD_BENCH_S3_ENDPOINT).
S3_BUCKET = "assetd-bench"
# moto checks no signature, but takes a request without Authorization as anonymous.
S3_DUMMY_AUTH = "AWS4-HMAC-SHA256 Credential=bench/20250101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0"
DATABASE = "assetd_bench"
SESSION = 1

MIB = 1024 * 1024
# "import" comes first: its assetd runs the outbox relay, which starts from the
# beginning of the log, and the log is nearly empty then (after the other rows it
# would have hundreds of thousands of events to publish before the first job).
STEPS = ["import", "archive", "upload", "download", "range", "signed", "s3", "small", "opentera", "pgbench", "memory", "aborted",
         "replay"]

# The import row: imports from the baseline nginx, run by the `jobs` assetd.
# Imports one worker runs at once (ASSETD_IMPORT_CONCURRENCY; assetd's default is 4).
# 32, one per client, gave 15-20 % more small imports a second than 4, with a lower p50
# and a higher p99 (BENCHMARKS.md, "Imports"); `--import-concurrency` compares.
IMPORT_CONCURRENCY = 32
# How often a client asks for its job's status.
IMPORT_POLL_SECONDS = 0.05
# Clients each asking for one small import after another.
IMPORT_CLIENTS = 32
IMPORT_SMALL_SIZE = 4096
# The longest one import may take before the run is called failed.
IMPORT_TIMEOUT_SECONDS = 600
IMPORT_RATIO_TARGET = 0.7
IMPORT_RSS_TARGET_MIB = 64

# The aborted-uploads row (issue 11): rounds of concurrent uploads, each cut off.
ABORTED_ROUNDS = 10
ABORTED_CONCURRENCY = 60
ABORTED_SIZE = 8 * MIB
# How long the server gets to give memory back after the last round.
ABORTED_SETTLE_SECONDS = 10
ABORTED_PEAK_TARGET_MIB = 128
ABORTED_SETTLED_TARGET_MIB = 64


def log(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(cmd, timeout, env=None, check=True, capture=True):
    result = subprocess.run(
        cmd,
        timeout=timeout,
        env=env,
        check=False,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE if capture else None,
        text=True,
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({result.returncode}): {result.stderr or result.stdout}")
    return result


class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.rounds = args.rounds
        self.work = os.path.abspath(args.work_dir)
        self.binary = args.binary
        self.server_url = args.database_server.rstrip("/")
        self.database_url = f"{self.server_url}/{DATABASE}"
        self.processes = []
        self.results = {}
        self.large_size = args.large_mib * MIB
        self.size_label = f"{args.large_mib // 1024} GiB" if args.large_mib % 1024 == 0 else f"{args.large_mib} MiB"
        self.small_seconds = args.small_seconds
        self.replay_events = args.replay_events
        self.secret = secrets.token_hex(32)
        # assetd's settings are ours alone: none of the caller's ASSETD_* leak in.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("ASSETD_")}
        self.env = dict(
            inherited,
            ASSETD_DATABASE_URL=self.database_url,
            ASSETD_DATA_DIR=os.path.join(self.work, "data"),
            ASSETD_JWT_SECRET=self.secret,
            ASSETD_URL_SIGNING_KEY=secrets.token_hex(32),
            ASSETD_LOG=os.environ.get("ASSETD_LOG", "warn"),
            # Publishing events and consuming commands are not what is measured, and
            # must not touch a local deployment's exchanges and queues.
            ASSETD_RELAY="false",
            ASSETD_COMMANDS="false",
            # Nor are jobs, but in the import row's own assetd (`jobs`). Every AMQP
            # name the bench's assetd use (exchanges, job queues) has the database's
            # name as prefix: never a local deployment's `assetd.jobs`, whose jobs a
            # worker on another database would take and drop as unknown.
            ASSETD_WORKERS="false",
            ASSETD_AMQP_PREFIX=DATABASE,
            # The import row's sources are on 127.0.0.1 (the baseline nginx).
            ASSETD_IMPORT_ALLOWLIST="127.0.0.1",
            NO_COLOR="1",
        )

    # ----- setup -----

    def setup(self):
        # A previous run's files are deleted after this run's measurements, not before:
        # on an ext4 without a journal (these machines), allocating inodes is slow for a
        # minute or more after many were deleted (ext4's `recently_deleted` check), which
        # would slow every upload measured here.
        self.leftovers = glob.glob(f"{self.work}.old-*")
        if os.path.exists(self.work):
            aside = f"{self.work}.old-{int(time.time())}"
            os.rename(self.work, aside)
            self.leftovers.append(aside)
        for sub in ["data/blobs", "data/tmp", "logs", "bodies", "files"]:
            os.makedirs(os.path.join(self.work, sub), exist_ok=True)
        # nginx's workers (nobody/www-data when started as root) read blobs and write
        # bodies here.
        for path in [self.work, os.path.join(self.work, "data"), os.path.join(self.work, "data/blobs"),
                     os.path.join(self.work, "files")]:
            os.chmod(path, 0o755)
        os.chmod(os.path.join(self.work, "bodies"), 0o777)
        os.umask(0o022)
        run(["psql", "-qw", f"{self.server_url}/postgres", "-c", f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"], 60)
        run(["psql", "-qw", f"{self.server_url}/postgres", "-c", f"CREATE DATABASE {DATABASE}"], 60)
        run([self.binary, "migrate"], 60, env=self.env)
        self.assetd_accel = self.start_assetd("accel", ASSETD_ACCEL_PORT, accel=True)
        self.assetd_plain = self.start_assetd("plain", ASSETD_PLAIN_PORT, accel=False)
        self.start_nginx_from_template("nginx-accel", NGINX_ACCEL_PORT, ASSETD_ACCEL_PORT)
        self.start_nginx_from_template("nginx-plain", NGINX_PLAIN_PORT, ASSETD_PLAIN_PORT)
        self.start_baseline_nginx()
        self.service_token = self.token("--kind", "service", "--name", "bench-service")
        self.user_token = self.token("--kind", "user", "--superadmin", "--name", "bench-user")
        status, body = self.request(
            "PUT",
            f"http://127.0.0.1:{ASSETD_ACCEL_PORT}/file/api/sessions/{SESSION}",
            {"Authorization": f"Bearer {self.service_token}", "Content-Type": "application/json"},
            json.dumps({"session_name": "bench"}).encode(),
        )
        if status != 200:
            raise RuntimeError(f"registering the bench session: {status} {body}")
        self.large_file = os.path.join(self.work, "files", "large.bin")
        log(f"writing a {self.large_size // MIB} MiB file of random bytes")
        with open("/dev/urandom", "rb") as source, open(self.large_file, "wb") as target:
            remaining = self.large_size
            while remaining:
                chunk = source.read(min(remaining, 8 * MIB))
                target.write(chunk)
                remaining -= len(chunk)

    def token(self, *args):
        return run([self.binary, "token", "--lifetime", "86400", *args], 30, env=self.env).stdout.strip()

    def start_assetd(self, name, port, accel, health_path="/file/health", **settings):
        env = dict(self.env, ASSETD_LISTEN=f"127.0.0.1:{port}", **settings)
        if accel:
            env["ASSETD_ACCEL_REDIRECT_PREFIX"] = "/_assetd_blobs/"
        else:
            env.pop("ASSETD_ACCEL_REDIRECT_PREFIX", None)
        out = open(os.path.join(self.work, "logs", f"assetd-{name}.log"), "ab")
        process = subprocess.Popen([self.binary, "serve"], env=env, stdout=out, stderr=subprocess.STDOUT)
        self.processes.append(("assetd", process))
        self.wait_until(f"http://127.0.0.1:{port}{health_path}", f"assetd {name}", process)
        return process

    def render(self, template, replacements, prefix):
        text = open(template).read()
        for key, value in replacements.items():
            text = text.replace("{{" + key + "}}", value)
        for sub in ["logs", "tmp"]:
            os.makedirs(os.path.join(prefix, sub), exist_ok=True)
        path = os.path.join(prefix, "nginx.conf")
        with open(path, "w") as f:
            f.write(text)
        return path

    def start_nginx(self, prefix, conf, probe):
        args = ["nginx", "-p", prefix + "/", "-c", conf, "-e", os.path.join(prefix, "logs/error.log")]
        run(args + ["-t", "-q"], 30)
        run(args, 30)
        self.processes.append(("nginx", args))
        self.wait_until(probe, "nginx", None, any_status=True)

    def start_nginx_from_template(self, name, port, upstream_port):
        prefix = os.path.join(self.work, name)
        conf = self.render(
            os.path.join(ROOT, "nginx/assetd.conf"),
            {
                "listen": f"127.0.0.1:{port}",
                "upstream": f"127.0.0.1:{upstream_port}",
                "blob_dir": os.path.join(self.work, "data/blobs"),
            },
            prefix,
        )
        # Our benchmarks are not about nginx's access log.
        with open(conf) as f:
            text = f.read().replace("access_log logs/access.log assetd;", "access_log off;")
        with open(conf, "w") as f:
            f.write(text)
        self.start_nginx(prefix, conf, f"http://127.0.0.1:{port}/file/health")

    def start_baseline_nginx(self):
        prefix = os.path.join(self.work, "nginx-baseline")
        conf = self.render(
            os.path.join(BENCH_DIR, "nginx-baseline.conf"),
            {
                "listen": f"127.0.0.1:{NGINX_BASELINE_PORT}",
                "blob_dir": os.path.join(self.work, "data/blobs"),
                "body_dir": os.path.join(self.work, "bodies"),
                "source_dir": os.path.join(self.work, "files"),
            },
            prefix,
        )
        self.start_nginx(prefix, conf, f"http://127.0.0.1:{NGINX_BASELINE_PORT}/done")

    def wait_until(self, url, what, process, any_status=False):
        deadline = time.time() + 60
        while time.time() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{what} exited ({process.returncode}); see {self.work}/logs")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return
            except urllib.error.HTTPError:
                if any_status:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{what} did not answer at {url}")

    def request(self, method, url, headers, body=None):
        request = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def stop(self):
        for kind, what in reversed(self.processes):
            self.stop_one(kind, what)
        self.processes = []

    def stop_one(self, kind, what):
        try:
            if kind == "nginx":
                subprocess.run(what + ["-s", "quit"], timeout=30, capture_output=True)
            else:
                what.send_signal(signal.SIGTERM)
                what.wait(timeout=40)
        except Exception as error:  # keep stopping the others
            log(f"stopping {kind}: {error}")
            if kind != "nginx":
                what.kill()

    # ----- transfers -----

    def auth(self):
        return ["-H", f"Authorization: OpenTera {self.user_token}"]

    def curl(self, args, timeout=600):
        result = run(["curl", "-sS", "--noproxy", "*", "-w", "%{http_code} %{size_download} %{time_total}", *args], timeout)
        status, size, seconds = result.stdout.strip().split()[-3:]
        return int(status), int(size), float(seconds)

    def upload_large(self, port, path_file=None):
        """One multipart upload of the large file to assetd; returns (seconds, asset_uuid)."""
        out = os.path.join(self.work, "files", "answer.json")
        status, _, seconds = self.curl(
            [
                "-o", out, *self.auth(),
                "-F", f'file_asset={{"id_session": {SESSION}, "asset_name": "large.bin"}};type=application/json',
                "-F", f"file=@{path_file or self.large_file};type=application/octet-stream",
                f"http://127.0.0.1:{port}/file/api/assets",
            ]
        )
        answer = open(out).read()
        if status != 200:
            raise RuntimeError(f"large upload answered {status}: {answer[:300]}")
        return seconds, json.loads(answer)["asset_uuid"]

    def upload_large_baseline(self):
        out = os.path.join(self.work, "files", "answer.json")
        status, _, seconds = self.curl(
            [
                "-o", out,
                "-F", f'file_asset={{"id_session": {SESSION}, "asset_name": "large.bin"}};type=application/json',
                "-F", f"file=@{self.large_file};type=application/octet-stream",
                f"http://127.0.0.1:{NGINX_BASELINE_PORT}/upload-to-file",
            ]
        )
        if status != 200:
            raise RuntimeError(f"baseline upload answered {status}")
        bodies = os.path.join(self.work, "bodies")
        written = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(bodies) for f in fs)
        if written < self.large_size:
            raise RuntimeError(f"the baseline wrote {written} bytes, fewer than the file's {self.large_size}")
        shutil.rmtree(bodies)
        os.makedirs(bodies)
        os.chmod(bodies, 0o777)
        return seconds

    def delete_asset(self, asset_uuid):
        status, body = self.request(
            "DELETE",
            f"http://127.0.0.1:{ASSETD_ACCEL_PORT}/file/api/assets?uuid={asset_uuid}",
            {"Authorization": f"OpenTera {self.user_token}"},
        )
        if status != 200:
            raise RuntimeError(f"delete answered {status}: {body[:200]}")

    def download(self, url, with_auth=True):
        status, size, seconds = self.curl(["-o", "/dev/null", *(self.auth() if with_auth else []), url])
        if status != 200 or size != self.large_size:
            raise RuntimeError(f"download of {url} answered {status} with {size} bytes")
        return seconds

    # ----- measurements -----

    def alternate(self, name, target, baseline, unit, invert):
        """Runs target and baseline alternately; `invert` turns seconds into a rate."""
        targets, baselines = [], []
        for round_number in range(self.rounds):
            # Each transfer starts with no dirty pages left by the one before.
            os.sync()
            targets.append(target())
            os.sync()
            baselines.append(baseline())
            log(f"{name} round {round_number + 1}/{self.rounds}: assetd {targets[-1]:.3f}, nginx {baselines[-1]:.3f}")
        convert = (lambda seconds: self.large_size / MIB / seconds) if invert else (lambda v: v)
        t = [convert(v) for v in targets]
        b = [convert(v) for v in baselines]
        self.results[name] = {
            "unit": unit,
            "assetd": summary(t),
            "nginx": summary(b),
            "ratio": statistics.median(t) / statistics.median(b),
        }

    def bench_large_upload(self):
        log("large uploads through nginx vs nginx writing the body to a file")

        def target():
            seconds, asset_uuid = self.upload_large(NGINX_ACCEL_PORT)
            self.delete_asset(asset_uuid)
            return seconds

        self.alternate(f"upload {self.size_label} through nginx", target, self.upload_large_baseline, "MiB/s", True)

        def direct():
            seconds, asset_uuid = self.upload_large(ASSETD_ACCEL_PORT)
            self.delete_asset(asset_uuid)
            return seconds

        self.alternate(f"upload {self.size_label} direct", direct, self.upload_large_baseline, "MiB/s", True)

        # The disk's own durable write rate, for reference: nginx's baseline leaves its
        # file in the page cache, assetd fsyncs before answering.
        rates = []
        for _ in range(self.rounds):
            os.sync()
            target = os.path.join(self.work, "files", "dd.bin")
            started = time.monotonic()
            run(["dd", f"if={self.large_file}", f"of={target}", "bs=1M", "conv=fsync", "status=none"], 600)
            rates.append(self.large_size / MIB / (time.monotonic() - started))
            os.remove(target)
        self.results["disk: the same file written and fsynced by dd"] = {"unit": "MiB/s", "reference": summary(rates)}

    def bench_large_download(self):
        log("large downloads vs nginx serving the same file statically")
        _, asset_uuid = self.upload_large(ASSETD_ACCEL_PORT)
        hexid = asset_uuid.replace("-", "")
        static = f"http://127.0.0.1:{NGINX_BASELINE_PORT}/static/{hexid[0:2]}/{hexid[2:4]}/{asset_uuid}"
        path = f"/file/api/assets?asset_uuid={asset_uuid}"

        def baseline():
            return self.download(static, with_auth=False)

        # Warm the page cache for everyone alike.
        self.download(static, with_auth=False)
        for name, port in [
            (f"download {self.size_label} via X-Accel-Redirect", NGINX_ACCEL_PORT),
            (f"download {self.size_label} proxied through nginx", NGINX_PLAIN_PORT),
            (f"download {self.size_label} direct", ASSETD_PLAIN_PORT),
        ]:
            self.alternate(name, lambda port=port: self.download(f"http://127.0.0.1:{port}{path}"), baseline, "MiB/s", True)
        self.download_asset = asset_uuid

    def api(self, method, path, body=None, port=NGINX_ACCEL_PORT):
        """A JSON API call as the user; returns the parsed answer (raises unless 2xx)."""
        headers = {"Authorization": f"OpenTera {self.user_token}", "Content-Type": "application/json"}
        data = None if body is None else json.dumps(body).encode()
        status, text = self.request(method, f"http://127.0.0.1:{port}/file{path}", headers, data)
        if not 200 <= status < 300:
            raise RuntimeError(f"{method} {path} answered {status}: {text[:300]}")
        return json.loads(text)

    def bench_signed(self):
        """Two-phase uploads (issue 14): the raw PUT to a signed upload URL through nginx,
        against nginx writing the same body to a file; then a signed download URL's GET
        (X-Accel-Redirect) against nginx serving the file statically."""
        log("signed PUTs of the large file through nginx vs nginx writing the body to a file")
        sha256 = self.large_sha256()

        def target():
            created = self.api("POST", "/api/uploads", {
                "id_session": SESSION, "filename": "large.bin", "size": self.large_size, "sha256": sha256})
            url = created["upload_url"]
            status, _, seconds = self.curl(["-o", "/dev/null", "-T", self.large_file,
                                            "-H", "Content-Type: application/octet-stream", url])
            if status != 200:
                raise RuntimeError(f"signed PUT answered {status}")
            asset = self.api("POST", f"/api/uploads/{created['upload_uuid']}/commit", {"asset_name": "large.bin"})
            self.delete_asset(asset["asset_uuid"])
            return seconds

        def baseline():
            out = os.path.join(self.work, "files", "answer.json")
            status, _, seconds = self.curl(["-o", out, "-T", self.large_file,
                                            f"http://127.0.0.1:{NGINX_BASELINE_PORT}/upload-to-file"])
            if status != 200:
                raise RuntimeError(f"baseline PUT answered {status}")
            bodies = os.path.join(self.work, "bodies")
            shutil.rmtree(bodies)
            os.makedirs(bodies)
            os.chmod(bodies, 0o777)
            return seconds

        self.alternate(f"signed PUT {self.size_label} through nginx", target, baseline, "MiB/s", True)

        log("signed download URLs vs nginx serving the same file statically")
        _, asset_uuid = self.upload_large(ASSETD_ACCEL_PORT)
        hexid = asset_uuid.replace("-", "")
        static = f"http://127.0.0.1:{NGINX_BASELINE_PORT}/static/{hexid[0:2]}/{hexid[2:4]}/{asset_uuid}"
        self.download(static, with_auth=False)

        def signed_download():
            link = self.api("POST", f"/api/assets/{asset_uuid}/download-url")
            return self.download(link["download_url"], with_auth=False)

        self.alternate(f"signed download {self.size_label} via X-Accel-Redirect", signed_download,
                       lambda: self.download(static, with_auth=False), "MiB/s", True)
        self.delete_asset(asset_uuid)

    def large_sha256(self):
        if not getattr(self, "_large_sha256", None):
            digest = hashlib.sha256()
            with open(self.large_file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            self._large_sha256 = digest.hexdigest()
        return self._large_sha256

    def bench_ranges(self):
        """1 MiB slices of the large file at concurrency 4: assetd through nginx (which
        authorises, then hands the range to nginx with X-Accel-Redirect) against nginx
        serving the same file statically. Slices/s and p50 latency."""
        log("1 MiB range requests at concurrency 4 vs nginx static")
        if not hasattr(self, "download_asset"):
            _, self.download_asset = self.upload_large(ASSETD_ACCEL_PORT)
        asset_uuid = self.download_asset
        hexid = asset_uuid.replace("-", "")
        static = f"http://127.0.0.1:{NGINX_BASELINE_PORT}/static/{hexid[0:2]}/{hexid[2:4]}/{asset_uuid}"
        target = f"http://127.0.0.1:{NGINX_ACCEL_PORT}/file/api/assets?asset_uuid={asset_uuid}"
        self.download(static, with_auth=False)  # the page cache warm for both
        seconds = self.small_seconds
        targets, baselines = [], []
        for round_number in range(self.rounds):
            targets.append(self.wrk_ranges(target, seconds, with_auth=True))
            baselines.append(self.wrk_ranges(static, seconds, with_auth=False))
            log(f"ranges round {round_number + 1}/{self.rounds}: assetd {targets[-1]['rate']:.0f}/s "
                f"(p50 {targets[-1]['p50_ms']:.2f} ms), nginx {baselines[-1]['rate']:.0f}/s "
                f"(p50 {baselines[-1]['p50_ms']:.2f} ms)")
        t = [r["rate"] for r in targets]
        b = [r["rate"] for r in baselines]
        self.results["1 MiB ranges via X-Accel-Redirect, concurrency 4"] = {
            "unit": "slices/s",
            "assetd": summary(t),
            "nginx": summary(b),
            "ratio": statistics.median(t) / statistics.median(b),
            "target_ratio": 0.8,
            "assetd_p50_ms": summary([r["p50_ms"] for r in targets]),
            "assetd_p99_ms": summary([r["p99_ms"] for r in targets]),
            "nginx_p50_ms": summary([r["p50_ms"] for r in baselines]),
        }

    def bench_s3(self):
        """The S3 backend against the moto server (ASSETD_BENCH_S3_ENDPOINT): the large file
        uploaded to an assetd on S3 (a multipart upload streamed from a staging file) against
        boto3 uploading the same file straight to the bucket (what `aws s3 cp` does: 8 MiB
        parts, 10 at once); then downloaded from that assetd (streamed from the bucket)
        against curl fetching the object straight from moto. Both sides are bounded by
        moto (one Python process), so the ratio is what assetd adds; with assetd's peak
        RSS meanwhile (constant memory whatever the size)."""
        endpoint = os.environ.get("ASSETD_BENCH_S3_ENDPOINT")
        boto_python = os.environ.get("ASSETD_BENCH_S3_PYTHON")
        if not endpoint or not boto_python:
            raise RuntimeError("the s3 step needs ASSETD_BENCH_S3_ENDPOINT and ASSETD_BENCH_S3_PYTHON (scripts/bench sets them)")
        log(f"S3 backend (moto at {endpoint}): {self.size_label} upload and download")
        status, body = self.request("PUT", f"{endpoint}/{S3_BUCKET}", {"Authorization": S3_DUMMY_AUTH})
        if status != 200:
            raise RuntimeError(f"creating the bench bucket: {status} {body[:200]}")
        s3_env = dict(AWS_ENDPOINT=endpoint, AWS_REGION="us-east-1", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_ALLOW_HTTP="true")
        process = self.start_assetd("s3", ASSETD_S3_PORT, accel=False, ASSETD_BLOBS=f"s3://{S3_BUCKET}/assetd", **s3_env)
        uploaded = []

        def target():
            seconds, asset_uuid = self.upload_large(ASSETD_S3_PORT)
            uploaded.append(asset_uuid)
            return seconds

        script = (
            "import boto3, sys, time\n"
            "s3 = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1',"
            " aws_access_key_id='bench', aws_secret_access_key='bench')\n"
            "started = time.monotonic()\n"
            "s3.upload_file(sys.argv[2], sys.argv[3], 'direct/large.bin')\n"
            "print(time.monotonic() - started)\n"
        )

        def baseline():
            result = run([boto_python, "-c", script, endpoint, self.large_file, S3_BUCKET], 900)
            return float(result.stdout.strip().splitlines()[-1])

        rss = self.peak_rss(process.pid, lambda: self.alternate(
            f"upload {self.size_label} to S3 (moto), direct", target, baseline, "MiB/s", True))
        self.results[f"upload {self.size_label} to S3 (moto), direct"]["baseline"] = "boto3 upload_file"
        self.results[f"peak RSS, {self.size_label} uploads to S3"] = {"unit": "MiB", "value": rss}
        asset_uuid = uploaded[-1]

        def download_target():
            return self.download(f"http://127.0.0.1:{ASSETD_S3_PORT}/file/api/assets?asset_uuid={asset_uuid}")

        def download_baseline():
            status, size, seconds = self.curl(
                ["-o", "/dev/null", "-H", f"Authorization: {S3_DUMMY_AUTH}", f"{endpoint}/{S3_BUCKET}/direct/large.bin"])
            if status != 200 or size != self.large_size:
                raise RuntimeError(f"the direct S3 download answered {status} with {size} bytes")
            return seconds

        rss = self.peak_rss(process.pid, lambda: self.alternate(
            f"download {self.size_label} from S3 (moto), direct", download_target, download_baseline, "MiB/s", True))
        self.results[f"peak RSS, {self.size_label} downloads from S3"] = {"unit": "MiB", "value": rss}

    def wrk_ranges(self, url, seconds, with_auth):
        headers = ["-H", f"Range: bytes={MIB}-{2 * MIB - 1}"]
        status, size, _ = self.curl(["-o", "/dev/null", *headers, *(self.auth() if with_auth else []), url])
        if status != 206 or size != MIB:
            raise RuntimeError(f"a 1 MiB slice of {url} answered {status} with {size} bytes")
        env = dict(os.environ, BENCH_TOKEN=self.user_token if with_auth else "", BENCH_FILE_SIZE=str(self.large_size))
        return self.run_wrk("range.lua", 4, url, seconds, env)

    def wrk(self, url, seconds):
        env = dict(os.environ, BENCH_TOKEN=self.user_token, BENCH_SESSION=str(SESSION), BENCH_FILE_SIZE="4096")
        return self.run_wrk("upload.lua", 32, url, seconds, env)

    def run_wrk(self, script, connections, url, seconds, env):
        """wrk with one of bench/*.lua (which print BENCH_LATENCY and BENCH_SUMMARY) on 2
        threads; any error fails the run. Rate, request count and latencies."""
        result = run(
            ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-s", os.path.join(BENCH_DIR, script), url],
            seconds + 60,
            env=env,
        )
        latency = dict(re.findall(r"(\w+)_us=(\d+)", re.search(r"BENCH_LATENCY.*", result.stdout).group(0)))
        counts = dict(re.findall(r"(\w+)=(\d+)", re.search(r"BENCH_SUMMARY.*", result.stdout).group(0)))
        errors = sum(int(counts[k]) for k in ["connect", "read", "write", "status", "timeout"])
        if errors:
            raise RuntimeError(f"wrk saw {errors} errors against {url}: {counts}\n{result.stdout}")
        rate = int(counts["requests"]) / (int(counts["duration_us"]) / 1e6)
        return {
            "rate": rate,
            "requests": int(counts["requests"]),
            "p50_ms": int(latency["p50"]) / 1000,
            "p99_ms": int(latency["p99"]) / 1000,
        }

    def bench_small_uploads(self):
        log(f"small uploads: 4 KiB, concurrency 32, {self.small_seconds} s per run")
        baseline_url = f"http://127.0.0.1:{NGINX_BASELINE_PORT}/answer-200"
        for name, port in [("4 KiB uploads through nginx", NGINX_ACCEL_PORT), ("4 KiB uploads direct", ASSETD_ACCEL_PORT)]:
            targets, baselines = [], []
            for round_number in range(self.rounds):
                before = self.uploaded_events()
                targets.append(self.wrk(f"http://127.0.0.1:{port}/file/api/assets", self.small_seconds))
                time.sleep(1)  # requests wrk stopped waiting for finish on their own
                recorded = self.uploaded_events() - before
                answered = targets[-1]["requests"]
                # Every 200 wrk counted is an upload recorded; beyond those, at most the
                # 32 that were in flight when wrk stopped.
                if not answered <= recorded <= answered + 32:
                    raise RuntimeError(f"wrk got {answered} answers but {recorded} uploads were recorded")
                baselines.append(self.wrk(baseline_url, self.small_seconds))
                log(
                    f"{name} round {round_number + 1}/{self.rounds}: assetd {targets[-1]['rate']:.0f}/s "
                    f"p99 {targets[-1]['p99_ms']:.1f} ms, nginx {baselines[-1]['rate']:.0f}/s"
                )
            self.results[name] = {
                "unit": "uploads/s",
                "assetd": summary([t["rate"] for t in targets]),
                "nginx": summary([b["rate"] for b in baselines]),
                "ratio": statistics.median([t["rate"] for t in targets]) / statistics.median([b["rate"] for b in baselines]),
                "assetd_p50_ms": summary([t["p50_ms"] for t in targets]),
                "assetd_p99_ms": summary([t["p99_ms"] for t in targets]),
                "nginx_p99_ms": summary([b["p99_ms"] for b in baselines]),
            }
        self.check_small_uploads_recorded()

    def uploaded_events(self):
        return int(self.psql("SELECT count(*) FROM events WHERE type = 'AssetUploaded'"))

    def check_small_uploads_recorded(self):
        """The store agrees with itself: uploads (and imports, when the import row ran
        first) minus deletions = live assets = files."""
        uploaded = self.uploaded_events()
        imported = int(self.psql("SELECT count(*) FROM events WHERE type = 'AssetImported'"))
        deleted = int(self.psql("SELECT count(*) FROM events WHERE type = 'AssetDeleted'"))
        live = int(self.psql("SELECT count(*) FROM assets WHERE asset_status = 'available'"))
        # The S3 row's assets are in the bucket; every other one is a file.
        in_bucket = int(self.psql("SELECT count(*) FROM assets WHERE asset_status = 'available' AND blob_backend = 's3'"))
        blobs = in_bucket + sum(len(files) for _, _, files in os.walk(os.path.join(self.work, "data/blobs")))
        self.results["uploads recorded"] = {
            "uploaded": uploaded,
            "imported": imported,
            "deleted": deleted,
            "live_assets": live,
            "blobs": blobs,
            "of_which_in_s3": in_bucket,
        }
        if not uploaded + imported - deleted == live == blobs:
            raise RuntimeError(
                f"{uploaded} uploaded + {imported} imported - {deleted} deleted, {live} live assets, {blobs} blobs"
            )

    # ----- OpenTera mode -----

    def bench_opentera(self):
        """assetd in OpenTera mode (README, "Replacing OpenTera's FileTransferService"),
        started for this row only: its own database (`<database>_ot`) and data directory,
        OpenTera's token keys and service record in a private redis-server (no
        persistence), TeraServer's two upload calls answered by a stand-in
        (bench/teraserver_standin.py, one Python process), and an nginx configured as
        OpenTera's in front (bench/nginx-opentera.conf: OpenTera's `location /file/`
        with nginx/assetd.conf's buffering and upstream keep-alive). Each upload there
        costs a Redis SISMEMBER (revoked tokens), a `POST /api/service/assets` to
        TeraServer and, every 2 s, a `GET /api/service/sessions` (cached).

        1. The large file uploaded through that nginx, then deleted (through TeraServer),
           against the native upload through nginx and the same nginx baseline as the
           upload row, alternately (the order of the three moves on each round).
        2. 4 KiB uploads at concurrency 32 (as the small row) through that nginx, against
           the native ones through nginx and nginx's /answer-200, alternately; with the
           CPU time per upload of assetd (each mode), of the stand-in and of Redis, and
           how busy the machine was.
        3. Peak RSS of the OpenTera-mode assetd over each part, and at rest."""
        ot_dir = os.path.join(self.work, "opentera")
        for sub in ["data/blobs", "data/tmp", "redis"]:
            os.makedirs(os.path.join(ot_dir, sub), exist_ok=True)
        database = f"{DATABASE}_ot"
        database_url = f"{self.server_url}/{database}"
        run(["psql", "-qw", f"{self.server_url}/postgres", "-c", f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"], 60)
        run(["psql", "-qw", f"{self.server_url}/postgres", "-c", f"CREATE DATABASE {database}"], 60)
        started = []  # (kind, what), stopped at the end of the row, last first
        try:
            # OpenTera's Redis: the keys TeraServer writes at its start, and the service record.
            redis_port = free_port()
            redis = subprocess.Popen(
                ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", os.path.join(ot_dir, "redis"), "--logfile", os.path.join(self.work, "logs", "redis-opentera.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            started.append(("redis", redis))
            self.wait_for_redis(redis_port, redis)
            keys = {name: secrets.token_hex(32) for name in [
                "UserTokenAPIKey", "ParticipantTokenAPIKey", "ParticipantStaticTokenAPIKey", "DeviceTokenAPIKey",
                "DeviceStaticTokenAPIKey", "ServiceTokenAPIKey"]}
            record = {"service_uuid": str(uuid.uuid4()), "id_service": 3, "service_clientendpoint": "/file",
                      "service_key": "FileTransferService"}
            redis_command(redis_port, "MSET", *[x for kv in keys.items() for x in kv],
                          "service.FileTransferService", json.dumps(record))
            user_uuid = str(uuid.uuid4())
            token = hs256(keys["UserTokenAPIKey"], {
                "user_uuid": user_uuid, "id_user": 1, "user_fullname": "bench user", "user_superadmin": True,
                "iat": int(time.time()), "exp": int(time.time()) + 12 * 3600, "iss": "TeraServer"})

            standin_port = free_port()
            standin = subprocess.Popen(
                [sys.executable, os.path.join(BENCH_DIR, "teraserver_standin.py"), "--port", str(standin_port),
                 "--user-uuid", user_uuid],
                stdout=open(os.path.join(self.work, "logs", "teraserver-standin.log"), "ab"), stderr=subprocess.STDOUT,
            )
            started.append(("teraserver stand-in", standin))
            stats_url = f"http://127.0.0.1:{standin_port}/_standin/stats"
            self.wait_until(stats_url, "the TeraServer stand-in", standin)

            run([self.binary, "migrate"], 60, env=dict(self.env, ASSETD_DATABASE_URL=database_url))
            assetd = self.start_assetd(
                "opentera", ASSETD_OT_PORT, accel=False, health_path="/health",
                ASSETD_DATABASE_URL=database_url,
                ASSETD_DATA_DIR=os.path.join(ot_dir, "data"),
                ASSETD_AMQP_PREFIX=database,
                ASSETD_OPENTERA_REDIS=f"redis://127.0.0.1:{redis_port}/0",
                ASSETD_OPENTERA_SERVER=f"http://127.0.0.1:{standin_port}",
            )
            # start_assetd keeps it for the bench's final stop; this row stops it itself.
            self.processes.remove(("assetd", assetd))
            started.append(("assetd", assetd))
            prefix = os.path.join(self.work, "nginx-opentera")
            conf = self.render(
                os.path.join(BENCH_DIR, "nginx-opentera.conf"),
                {"listen": f"127.0.0.1:{NGINX_OT_PORT}", "upstream": f"127.0.0.1:{ASSETD_OT_PORT}"},
                prefix,
            )
            self.start_nginx(prefix, conf, f"http://127.0.0.1:{NGINX_OT_PORT}/file/health")
            started.append(self.processes.pop())
            self.measure_opentera(assetd, redis, standin, token, stats_url, database_url, ot_dir)
        finally:
            for kind, what in reversed(started):
                self.stop_one(kind, what)

    def wait_for_redis(self, port, process):
        deadline = time.time() + 30
        while time.time() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited ({process.returncode}); see {self.work}/logs/redis-opentera.log")
            try:
                if redis_command(port, "PING") == "PONG":
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"redis-server did not answer on 127.0.0.1:{port}")

    def measure_opentera(self, assetd, redis, standin, token, stats_url, database_url, ot_dir):
        ot_url = f"http://127.0.0.1:{NGINX_OT_PORT}/file/api/assets"
        pid = assetd.pid
        at_rest = self.rss(pid)

        def stats():
            with urllib.request.urlopen(stats_url, timeout=10) as answer:
                return json.load(answer)

        def ot_uploaded():
            return int(self.psql("SELECT count(*) FROM events WHERE type = 'AssetUploaded'", database_url=database_url))

        # 1. Large uploads: OpenTera mode, native, nginx alone, alternately.
        log(f"OpenTera mode: {self.size_label} uploads through nginx (OpenTera's, as configured here), "
            "native through nginx, nginx writing the body to a file")

        def ot_large():
            out = os.path.join(self.work, "files", "answer-opentera.json")
            status, _, seconds = self.curl([
                "-o", out, "-H", f"Authorization: OpenTera {token}",
                "-F", f'file_asset={{"id_session": {SESSION}, "asset_name": "large.bin"}};type=application/json',
                "-F", f"file=@{self.large_file};type=application/octet-stream",
                ot_url,
            ])
            answer = open(out).read()
            if status != 200:
                raise RuntimeError(f"OpenTera-mode large upload answered {status}: {answer[:300]}")
            answer = json.loads(answer)
            if answer.get("asset_file_size") != self.large_size or not answer.get("id_asset"):
                raise RuntimeError(f"OpenTera-mode large upload answered {answer}")
            query = f"uuid={answer['asset_uuid']}&access_token={answer['access_token']}"
            status, body = self.request("DELETE", f"{ot_url}?{query}", {"Authorization": f"OpenTera {token}"})
            if status != 200:
                raise RuntimeError(f"OpenTera-mode delete answered {status}: {body[:300]}")
            return seconds

        def native_large():
            seconds, asset_uuid = self.upload_large(NGINX_ACCEL_PORT)
            self.delete_asset(asset_uuid)
            return seconds

        large = {"opentera": [], "native": [], "nginx": []}

        def large_rounds():
            for round_number in range(self.rounds):
                for name, transfer in rotated([("opentera", ot_large), ("native", native_large),
                                               ("nginx", self.upload_large_baseline)], round_number):
                    os.sync()
                    large[name].append(self.large_size / MIB / transfer())
                log(f"opentera large round {round_number + 1}/{self.rounds}: OpenTera mode {large['opentera'][-1]:.0f}, "
                    f"native {large['native'][-1]:.0f}, nginx {large['nginx'][-1]:.0f} MiB/s")

        peak_large = self.peak_rss(pid, large_rounds)
        label = f"upload {self.size_label} through nginx"
        for name, mode in [("opentera", "OpenTera mode"), ("native", "native, same rounds")]:
            self.results[f"{label}, {mode}"] = {
                "unit": "MiB/s", "assetd": summary(large[name]), "nginx": summary(large["nginx"]),
                "ratio": statistics.median(large[name]) / statistics.median(large["nginx"]),
            }
        self.results[f"{label}: OpenTera mode ÷ native"] = {
            "unit": "×", "value": statistics.median(large["opentera"]) / statistics.median(large["native"])}

        # 2. Small uploads: OpenTera mode, native, nginx's /answer-200, alternately.
        log(f"OpenTera mode: 4 KiB uploads, concurrency 32, {self.small_seconds} s per run "
            "(OpenTera mode, native, nginx alone)")
        small = {"opentera": [], "native": [], "nginx": []}
        seconds = self.small_seconds

        def one_run(url, user_token, recorded_count, assetd_pid):
            """One wrk run, with the CPU seconds assetd, the stand-in and Redis used, the
            machine's idle share, and the uploads recorded checked against the 200s."""
            before = (recorded_count() if recorded_count else 0, cpu_seconds(assetd_pid) if assetd_pid else 0,
                      cpu_seconds(standin.pid), cpu_seconds(redis.pid), machine_cpu(), stats())
            env = dict(os.environ, BENCH_TOKEN=user_token, BENCH_SESSION=str(SESSION), BENCH_FILE_SIZE="4096")
            result = self.run_wrk("upload.lua", 32, url, seconds, env)
            after = (cpu_seconds(assetd_pid) if assetd_pid else 0, cpu_seconds(standin.pid), cpu_seconds(redis.pid),
                     machine_cpu())
            time.sleep(1)  # requests wrk stopped waiting for finish on their own
            answered = result["requests"]
            if not answered:
                raise RuntimeError(f"wrk got no answer from {url} in {seconds} s")
            if recorded_count:
                recorded = recorded_count() - before[0]
                if not answered <= recorded <= answered + 32:
                    raise RuntimeError(f"wrk got {answered} answers from {url} but {recorded} uploads were recorded")
            calls = {k: v - before[5][k] for k, v in stats().items()}
            idle, total = after[3][0] - before[4][0], after[3][1] - before[4][1]
            result.update(
                assetd_cpu_us=(after[0] - before[1]) / answered * 1e6,
                standin_cpu_us=(after[1] - before[2]) / answered * 1e6,
                standin_core_share=(after[1] - before[2]) / seconds,
                redis_cpu_us=(after[2] - before[3]) / answered * 1e6,
                machine_busy=1 - idle / total if total else 0,
                teraserver_calls=calls,
            )
            return result

        runs = {
            "opentera": lambda: one_run(ot_url, token, ot_uploaded, pid),
            "native": lambda: one_run(f"http://127.0.0.1:{NGINX_ACCEL_PORT}/file/api/assets", self.user_token,
                                      self.uploaded_events, self.assetd_accel.pid),
            "nginx": lambda: one_run(f"http://127.0.0.1:{NGINX_BASELINE_PORT}/answer-200", token, None, None),
        }

        def small_rounds():
            for round_number in range(self.rounds):
                for name in rotated(["opentera", "native", "nginx"], round_number):
                    os.sync()
                    small[name].append(runs[name]())
                calls = small["opentera"][-1]["teraserver_calls"]
                if calls["assets_created"] < small["opentera"][-1]["requests"]:
                    raise RuntimeError(f"{small['opentera'][-1]['requests']} uploads answered, but TeraServer "
                                       f"created {calls['assets_created']} assets")
                o, n = small["opentera"][-1], small["native"][-1]
                log(f"opentera small round {round_number + 1}/{self.rounds}: OpenTera mode {o['rate']:.0f}/s "
                    f"p50 {o['p50_ms']:.1f} p99 {o['p99_ms']:.1f} ms (assetd {o['assetd_cpu_us']:.0f} µs CPU/upload, "
                    f"stand-in {o['standin_cpu_us']:.0f}, Redis {o['redis_cpu_us']:.0f}; machine busy "
                    f"{o['machine_busy']:.0%}; TeraServer calls {o['teraserver_calls']}); native {n['rate']:.0f}/s "
                    f"p50 {n['p50_ms']:.1f} p99 {n['p99_ms']:.1f} ms (assetd {n['assetd_cpu_us']:.0f} µs; busy "
                    f"{n['machine_busy']:.0%}); nginx {small['nginx'][-1]['rate']:.0f}/s")

        peak_small = self.peak_rss(pid, small_rounds)
        nginx_rates = [r["rate"] for r in small["nginx"]]
        for name, mode in [("opentera", "OpenTera mode"), ("native", "native, same rounds")]:
            runs = small[name]
            rates = [r["rate"] for r in runs]
            self.results[f"4 KiB uploads through nginx, {mode}"] = {
                "unit": "uploads/s",
                "assetd": summary(rates),
                "nginx": summary(nginx_rates),
                "ratio": statistics.median(rates) / statistics.median(nginx_rates),
                "assetd_p50_ms": summary([r["p50_ms"] for r in runs]),
                "assetd_p99_ms": summary([r["p99_ms"] for r in runs]),
                "assetd_cpu_us_per_upload": summary([r["assetd_cpu_us"] for r in runs]),
                "machine_busy": summary([r["machine_busy"] for r in runs]),
            }
        ot_runs = small["opentera"]
        ot_rate = statistics.median([r["rate"] for r in ot_runs])
        self.results["4 KiB uploads through nginx: OpenTera mode ÷ native"] = {
            "unit": "×", "value": ot_rate / statistics.median([r["rate"] for r in small["native"]])}
        if "4 KiB uploads through nginx" in self.results:  # the small row ran before, in this invocation
            self.results["4 KiB uploads through nginx: OpenTera mode ÷ the small row's native"] = {
                "unit": "×", "value": ot_rate / self.results["4 KiB uploads through nginx"]["assetd"]["median"]}
        for label, key in [("assetd", "assetd_cpu_us"), ("TeraServer stand-in", "standin_cpu_us"),
                           ("Redis", "redis_cpu_us")]:
            self.results[f"CPU per 4 KiB upload in OpenTera mode: {label}"] = {
                "unit": "µs", "value": statistics.median([r[key] for r in ot_runs]),
                "values": [r[key] for r in ot_runs]}
        self.results["CPU per 4 KiB upload, native: assetd"] = {
            "unit": "µs", "value": statistics.median([r["assetd_cpu_us"] for r in small["native"]]),
            "values": [r["assetd_cpu_us"] for r in small["native"]]}
        self.results["TeraServer stand-in's share of a core during the OpenTera 4 KiB runs"] = {
            "unit": "%", "value": 100 * statistics.median([r["standin_core_share"] for r in ot_runs]),
            "values": [r["standin_core_share"] for r in ot_runs]}
        for name, mode in [("opentera", "OpenTera"), ("native", "native"), ("nginx", "nginx alone")]:
            self.results[f"machine busy (both cores) during the {mode} 4 KiB runs"] = {
                "unit": "%", "value": 100 * statistics.median([r["machine_busy"] for r in small[name]])}
        self.results["TeraServer calls during the OpenTera 4 KiB runs"] = {
            "per_run": [r["teraserver_calls"] for r in ot_runs],
            "uploads_answered": [r["requests"] for r in ot_runs],
        }

        # 3. Memory, and the store agreeing with itself.
        self.results["RSS at rest, OpenTera-mode assetd"] = {"unit": "MiB", "value": at_rest}
        self.results[f"peak RSS, OpenTera-mode assetd, {self.size_label} uploads one at a time"] = {
            "unit": "MiB", "value": peak_large}
        self.results["peak RSS, OpenTera-mode assetd, 4 KiB uploads at concurrency 32"] = {
            "unit": "MiB", "value": peak_small}
        uploaded = ot_uploaded()
        deleted = int(self.psql("SELECT count(*) FROM events WHERE type = 'AssetDeleted'", database_url=database_url))
        live = int(self.psql("SELECT count(*) FROM assets WHERE asset_status = 'available'", database_url=database_url))
        with_id = int(self.psql("SELECT count(*) FROM assets WHERE asset_status = 'available' "
                                "AND opentera_id_asset IS NOT NULL", database_url=database_url))
        blobs = sum(len(files) for _, _, files in os.walk(os.path.join(ot_dir, "data/blobs")))
        self.results["OpenTera-mode uploads recorded"] = {
            "uploaded": uploaded, "deleted": deleted, "live_assets": live, "with_id_asset": with_id, "blobs": blobs}
        if not uploaded - deleted == live == blobs == with_id:
            raise RuntimeError(f"OpenTera mode: {uploaded} uploaded - {deleted} deleted, {live} live assets "
                               f"({with_id} with TeraServer's id_asset), {blobs} blobs")


    def psql(self, sql, timeout=600, database_url=None):
        return run(["psql", "-qtAw", database_url or self.database_url, "-c", sql], timeout).stdout.strip()

    def bench_pgbench(self):
        log("pgbench: single-row inserts at concurrency 32 (the database's ceiling)")
        self.psql("CREATE TABLE IF NOT EXISTS bench_ceiling (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v bigint)")
        script = os.path.join(self.work, "files", "ceiling.sql")
        with open(script, "w") as f:
            f.write("INSERT INTO bench_ceiling (v) VALUES (1);\n")
        seconds = max(3, self.small_seconds // 2)
        result = run(
            [pgbench(), "-n", "-c", "32", "-j", "2", "-T", str(seconds), "-f", script, self.database_url], seconds + 60
        )
        tps = float(re.search(r"tps = ([\d.]+)", result.stdout).group(1))
        self.results["pgbench single-row inserts, c=32"] = {"unit": "tps", "value": tps}
        self.psql("DROP TABLE bench_ceiling")

    def peak_rss(self, pid, load):
        """Peak RSS (MiB) of `pid` while `load` runs: the kernel's high-water mark, reset first."""
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        load()
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024

    def bench_memory(self):
        log("peak RSS during 4 concurrent large uploads, then 4 concurrent large downloads (direct)")
        pid = self.assetd_plain.pid
        if not hasattr(self, "download_asset"):
            _, self.download_asset = self.upload_large(ASSETD_ACCEL_PORT)
        url = f"http://127.0.0.1:{ASSETD_PLAIN_PORT}/file/api/assets"

        def uploads():
            out = os.path.join(self.work, "files")
            procs = [
                subprocess.Popen(
                    ["curl", "-sS", "--noproxy", "*", "-o", f"{out}/rss-{i}.json", "-w", "%{http_code}", *self.auth(),
                     "-F", f'file_asset={{"id_session": {SESSION}, "asset_name": "rss.bin"}};type=application/json',
                     "-F", f"file=@{self.large_file};type=application/octet-stream", url],
                    stdout=subprocess.PIPE, text=True,
                )
                for i in range(4)
            ]
            for i, proc in enumerate(procs):
                code = proc.communicate(timeout=900)[0]
                if code != "200":
                    raise RuntimeError(f"concurrent upload answered {code}")
                self.delete_asset(json.load(open(f"{out}/rss-{i}.json"))["asset_uuid"])

        def downloads():
            procs = [
                subprocess.Popen(
                    ["curl", "-sS", "--noproxy", "*", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", *self.auth(),
                     f"http://127.0.0.1:{ASSETD_PLAIN_PORT}/file/api/assets?asset_uuid={self.download_asset}"],
                    stdout=subprocess.PIPE, text=True,
                )
                for _ in range(4)
            ]
            for proc in procs:
                if proc.communicate(timeout=900)[0] != f"200 {self.large_size}":
                    raise RuntimeError("concurrent download failed")

        with open(f"/proc/{pid}/status") as f:
            idle = int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) / 1024
        self.results[f"peak RSS, 4 concurrent {self.size_label} uploads"] = {"unit": "MiB", "value": self.peak_rss(pid, uploads)}
        self.results[f"peak RSS, 4 concurrent {self.size_label} downloads"] = {"unit": "MiB", "value": self.peak_rss(pid, downloads)}
        self.results["RSS at rest"] = {"unit": "MiB", "value": idle}

    def bench_aborted_uploads(self):
        """Memory held for uploads that never finish: `ABORTED_ROUNDS` rounds of
        `ABORTED_CONCURRENCY` concurrent multipart uploads of `ABORTED_SIZE`, each sent
        up to a random byte and then closed, straight to assetd (plain). Peak RSS over
        all rounds, and RSS once the server has had `ABORTED_SETTLE_SECONDS` to give
        memory back; then no temporary file may be left."""
        log(
            f"aborted uploads: {ABORTED_ROUNDS} rounds of {ABORTED_CONCURRENCY} concurrent "
            f"{ABORTED_SIZE // MIB} MiB uploads, each cut off at a random byte"
        )
        pid = self.assetd_plain.pid
        boundary = "assetd-bench-aborted"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file_asset"\r\n\r\n'
            f'{{"id_session": {SESSION}, "asset_name": "aborted.bin"}}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="aborted.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        length = len(head) + ABORTED_SIZE + len(f"\r\n--{boundary}--\r\n")
        request = (
            f"POST /file/api/assets HTTP/1.1\r\nHost: 127.0.0.1:{ASSETD_PLAIN_PORT}\r\n"
            f"Authorization: OpenTera {self.user_token}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {length}\r\n\r\n"
        ).encode() + head
        payload = memoryview(os.urandom(ABORTED_SIZE))
        # The same cut-off points in every run.
        cuts = random.Random(11)
        failures = []

        def upload_cut_at(cut):
            try:
                with socket.create_connection(("127.0.0.1", ASSETD_PLAIN_PORT), timeout=60) as conn:
                    conn.sendall(request)
                    for offset in range(0, cut, 256 * 1024):
                        conn.sendall(payload[offset:min(cut, offset + 256 * 1024)])
            except OSError as error:  # the server may answer and close first; that is fine
                if not isinstance(error, (ConnectionResetError, BrokenPipeError)):
                    failures.append(error)

        def rounds():
            for round_number in range(ABORTED_ROUNDS):
                threads = [
                    threading.Thread(target=upload_cut_at, args=(cuts.randrange(1, ABORTED_SIZE),))
                    for _ in range(ABORTED_CONCURRENCY)
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(timeout=300)
                if failures:
                    raise RuntimeError(f"aborted uploads: {failures[0]}")
                log(f"aborted uploads round {round_number + 1}/{ABORTED_ROUNDS}: RSS {self.rss(pid):.1f} MiB")

        before = self.rss(pid)
        peak = self.peak_rss(pid, rounds)
        time.sleep(ABORTED_SETTLE_SECONDS)
        settled = self.rss(pid)
        tmp = os.path.join(self.work, "data/tmp")
        left = len(os.listdir(tmp))
        if left:
            raise RuntimeError(f"aborted uploads left {left} temporary files in {tmp}")
        self.wait_until(f"http://127.0.0.1:{ASSETD_PLAIN_PORT}/file/health", "assetd plain", self.assetd_plain)
        label = f"{ABORTED_CONCURRENCY} concurrent aborted {ABORTED_SIZE // MIB} MiB uploads, {ABORTED_ROUNDS} rounds"
        self.results[f"RSS before {label}"] = {"unit": "MiB", "value": before}
        self.results[f"peak RSS, {label}"] = {"unit": "MiB", "value": peak, "target": ABORTED_PEAK_TARGET_MIB}
        self.results[f"settled RSS {ABORTED_SETTLE_SECONDS} s after {label}"] = {
            "unit": "MiB",
            "value": settled,
            "target": ABORTED_SETTLED_TARGET_MIB,
        }

    def rss(self, pid):
        with open(f"/proc/{pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) / 1024

    # ----- imports (jobs) -----

    def bench_import(self):
        """Imports from URLs, run as jobs by a third assetd (`jobs`: relay and workers on,
        on the bench's own RabbitMQ prefix, stopped after this row), from the baseline
        nginx's /source/ location:

        1. the large file imported (from the POST to the job's `succeeded`, polled every
           `IMPORT_POLL_SECONDS`) against `curl -o` of the same URL to a file in the data
           directory, alternately; the durable time of curl's file (curl, then fsync of
           the file and its directory) is reported beside it for reference, since the
           import is durable at `succeeded` and the baseline, as the others, is not;
        2. the `jobs` assetd's peak RSS over those imports, and over 4 concurrent ones;
        3. small imports, `IMPORT_CLIENTS` clients each importing one after another for
           `small_seconds`: imports/s and latency, as the clients saw it (to the poll
           that saw `succeeded`) and as the server recorded it (JobQueued to
           JobSucceeded)."""
        self.assetd_jobs = self.start_assetd(
            "jobs",
            ASSETD_JOBS_PORT,
            accel=False,
            ASSETD_RELAY="true",
            ASSETD_WORKERS="true",
            ASSETD_IMPORT_CONCURRENCY=str(self.args.import_concurrency),
        )
        try:
            self.measure_imports()
        finally:
            self.processes.remove(("assetd", self.assetd_jobs))
            self.stop_one("assetd", self.assetd_jobs)
        self.check_imports_recorded()

    def bench_archive(self):
        """Archives (issue 15), built by a third assetd (`jobs`, as for imports) from a
        session of its own holding the large file (random bytes: deflated, as a type that
        is not already compressed) and a text file: from the POST to `completed`
        (polled), against `zip -1` (Info-ZIP at its fastest deflate level; assetd deflates
        at zlib-rs's level 2) zipping the same two files into the data directory,
        alternately. Both read the
        files warm from the page cache; neither is fsynced by its tool (assetd's zip is
        fsynced before `completed`). The `jobs` assetd's peak RSS over the archives is
        reported beside."""
        archive_session = SESSION + 1
        status, body = self.request(
            "PUT",
            f"http://127.0.0.1:{ASSETD_ACCEL_PORT}/file/api/sessions/{archive_session}",
            {"Authorization": f"Bearer {self.service_token}", "Content-Type": "application/json"},
            json.dumps({"session_name": "archive bench"}).encode(),
        )
        if status != 200:
            raise RuntimeError(f"registering the archive session: {status} {body}")
        text_file = os.path.join(self.work, "files", "notes.txt")
        with open(text_file, "w") as f:
            for line in range(200_000):
                f.write(f"line {line}: the quick brown fox jumps over the lazy dog\n")
        for path, media_type in [(self.large_file, "application/octet-stream"), (text_file, "text/plain")]:
            out = os.path.join(self.work, "files", "answer.json")
            name = os.path.basename(path)
            status, _, _ = self.curl([
                "-o", out, *self.auth(),
                "-F", f'file_asset={{"id_session": {archive_session}, "asset_name": "{name}"}};type=application/json',
                "-F", f"file=@{path};type={media_type}",
                f"http://127.0.0.1:{ASSETD_ACCEL_PORT}/file/api/assets",
            ])
            if status != 200:
                raise RuntimeError(f"uploading {name} for the archive row answered {status}")
        total_mib = (self.large_size + os.path.getsize(text_file)) / MIB
        self.assetd_jobs = self.start_assetd(
            "jobs", ASSETD_JOBS_PORT, accel=False, ASSETD_RELAY="true", ASSETD_WORKERS="true")
        pid = self.assetd_jobs.pid
        archives = []
        try:
            def target():
                started = time.monotonic()
                accepted = self.api("POST", "/api/archives", {"id_session": archive_session}, port=ASSETD_JOBS_PORT)
                while True:
                    time.sleep(IMPORT_POLL_SECONDS)
                    info = self.api("GET", f"/api/archives/infos?archive_uuid={accepted['archive_uuid']}",
                                    port=ASSETD_JOBS_PORT)
                    if info["archive_status"] == "completed":
                        archives.append(info)
                        seconds = time.monotonic() - started
                        self.api("DELETE", f"/api/archives?uuid={accepted['archive_uuid']}", port=ASSETD_JOBS_PORT)
                        return seconds
                    if info["archive_status"] not in ("pending", "in_progress"):
                        raise RuntimeError(f"archive {accepted['archive_uuid']}: {info}")
                    if time.monotonic() - started > IMPORT_TIMEOUT_SECONDS:
                        raise RuntimeError(f"archive still {info['archive_status']} after {IMPORT_TIMEOUT_SECONDS} s")

            def baseline():
                target_zip = os.path.join(self.work, "data", "baseline.zip")
                started = time.monotonic()
                run(["zip", "-q", "-1", "-j", target_zip, self.large_file, text_file], 1800)
                seconds = time.monotonic() - started
                os.remove(target_zip)
                return seconds

            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
            targets, baselines = [], []
            for round_number in range(self.rounds):
                os.sync()
                targets.append(target())
                os.sync()
                baselines.append(baseline())
                log(f"archive round {round_number + 1}/{self.rounds}: assetd {targets[-1]:.3f} s, zip {baselines[-1]:.3f} s")
            with open(f"/proc/{pid}/status") as f:
                peak = int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) / 1024
            t = [total_mib / v for v in targets]
            b = [total_mib / v for v in baselines]
            self.results[f"archive of {self.size_label} + 12 MiB of text (job, to completed) vs zip -1"] = {
                "unit": "MiB/s", "assetd": summary(t), "nginx": summary(b),
                "ratio": statistics.median(t) / statistics.median(b),
            }
            self.results["peak RSS of the jobs assetd over the archives"] = {"unit": "MiB", "value": peak, "target": 64}
            sizes = sorted({a["archive_file_size"] for a in archives})
            log(f"archive sizes: {sizes}")
        finally:
            self.processes.remove(("assetd", self.assetd_jobs))
            self.stop_one("assetd", self.assetd_jobs)

    def import_request(self, client, name, path, sha256=None):
        body = {
            "id_session": SESSION,
            "url": f"http://127.0.0.1:{NGINX_BASELINE_PORT}/source/{path}",
            "asset_name": name,
            "id_user": self.import_creator,
        }
        if sha256:
            body["sha256"] = sha256
        return client.post_json("/file/api/imports", body)

    def import_one(self, client, name, path, sha256=None):
        """One import to `succeeded`: (seconds from the POST to the poll that saw it, the
        job as then answered). Raises on any other end, or after IMPORT_TIMEOUT_SECONDS."""
        started = time.monotonic()
        status, body = self.import_request(client, name, path, sha256)
        if status != 202:
            raise RuntimeError(f"import request answered {status}: {body[:300]}")
        job_uuid = json.loads(body)["job_uuid"]
        while True:
            time.sleep(IMPORT_POLL_SECONDS)
            status, body = client.get(f"/file/api/jobs/{job_uuid}")
            if status != 200:
                raise RuntimeError(f"job {job_uuid} answered {status}: {body[:300]}")
            job = json.loads(body)
            if job["status"] == "succeeded":
                return time.monotonic() - started, job
            if job["status"] in ("failed", "cancelled"):
                raise RuntimeError(f"import job {job_uuid} {job['status']}: {job.get('error')}")
            if time.monotonic() - started > IMPORT_TIMEOUT_SECONDS:
                raise RuntimeError(f"import job {job_uuid} still {job['status']} after {IMPORT_TIMEOUT_SECONDS} s: {job}")

    def measure_imports(self):
        pid = self.assetd_jobs.pid
        self.import_creator = str(uuid.uuid4())
        headers = {"Authorization": f"Bearer {self.service_token}"}
        client = KeepAliveClient(ASSETD_JOBS_PORT, headers)
        small = os.path.join(self.work, "files", "small.bin")
        with open(small, "wb") as f:
            f.write(os.urandom(IMPORT_SMALL_SIZE))
        # The workers are consuming once a first import went through.
        seconds, _ = self.import_one(client, "warm-up.bin", "small.bin")
        log(f"imports: the first small import took {seconds * 1000:.0f} ms (workers up)")
        large_sha256 = sha256_of(self.large_file)
        url = f"http://127.0.0.1:{NGINX_BASELINE_PORT}/source/large.bin"
        peaks, durable = [], []

        def target():
            box = {}

            def load():
                box["seconds"], box["job"] = self.import_one(client, "large.bin", "large.bin", large_sha256)

            peaks.append(self.peak_rss(pid, load))
            job = box["job"]
            result = job.get("result") or {}
            if result.get("asset_file_size") != self.large_size or not result.get("asset_uuid"):
                raise RuntimeError(f"the large import's job says {job}")
            self.delete_asset(job["result"]["asset_uuid"])
            return box["seconds"]

        def baseline():
            out = os.path.join(self.work, "data", "curl-import.bin")
            started = time.monotonic()
            status, size, _ = self.curl(["-o", out, url])
            seconds = time.monotonic() - started
            if status != 200 or size != self.large_size:
                raise RuntimeError(f"curl of {url} answered {status} with {size} bytes")
            fd = os.open(out, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(os.path.dirname(out))
            durable.append(time.monotonic() - started)
            os.remove(out)
            return seconds

        log(f"imports: {self.size_label} from nginx (POST to succeeded) vs curl -o of the same URL")
        name = f"import {self.size_label} from nginx, POST to succeeded, vs curl -o"
        self.alternate(name, target, baseline, "MiB/s", True)
        self.results[name]["target_ratio"] = IMPORT_RATIO_TARGET
        self.results[f"curl -o of the same {self.size_label}, then fsync of file and directory"] = {
            "unit": "MiB/s",
            "reference": summary([self.large_size / MIB / s for s in durable]),
        }
        self.results[f"peak RSS, {self.size_label} imports one at a time"] = {
            "unit": "MiB",
            "value": max(peaks),
            "values": peaks,
            "target": IMPORT_RSS_TARGET_MIB,
        }

        def concurrent():
            failures = []

            def one(i):
                try:
                    _, job = self.import_one(
                        KeepAliveClient(ASSETD_JOBS_PORT, headers), f"rss-{i}.bin", "large.bin", large_sha256
                    )
                    self.delete_asset(job["result"]["asset_uuid"])
                except Exception as error:  # reported below
                    failures.append(error)

            threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=IMPORT_TIMEOUT_SECONDS + 60)
            if failures or any(thread.is_alive() for thread in threads):
                raise RuntimeError(f"concurrent large imports: {failures or 'still running'}")

        os.sync()
        started = time.monotonic()
        peak = self.peak_rss(pid, concurrent)
        log(f"imports: 4 concurrent {self.size_label} imports in {time.monotonic() - started:.1f} s, peak RSS {peak:.1f} MiB")
        self.results[f"peak RSS, 4 concurrent {self.size_label} imports"] = {
            "unit": "MiB",
            "value": peak,
            "target": IMPORT_RSS_TARGET_MIB,
        }

        log(f"imports: {IMPORT_SMALL_SIZE // 1024} KiB, {IMPORT_CLIENTS} clients, {self.small_seconds} s per round")
        rounds = []
        for round_number in range(self.rounds):
            os.sync()
            rounds.append(self.small_imports(headers))
            r = rounds[-1]
            log(
                f"small imports round {round_number + 1}/{self.rounds}: {r['rate']:.0f}/s, "
                f"client p50 {r['p50_ms']:.0f} ms p99 {r['p99_ms']:.0f} ms, "
                f"server p50 {r['server_p50_ms']:.0f} ms p99 {r['server_p99_ms']:.0f} ms"
            )
        self.results[f"{IMPORT_SMALL_SIZE // 1024} KiB imports, {IMPORT_CLIENTS} clients, request to succeeded"] = {
            "unit": "imports/s",
            "imports": sum(r["imports"] for r in rounds),
            "assetd": summary([r["rate"] for r in rounds]),
            "assetd_p50_ms": summary([r["p50_ms"] for r in rounds]),
            "assetd_p99_ms": summary([r["p99_ms"] for r in rounds]),
            "server_p50_ms": summary([r["server_p50_ms"] for r in rounds]),
            "server_p99_ms": summary([r["server_p99_ms"] for r in rounds]),
            "import_concurrency": self.args.import_concurrency,
            "poll_ms": IMPORT_POLL_SECONDS * 1000,
        }

    def small_imports(self, headers):
        """One round: every client imports the small file, one import after another,
        until `small_seconds` have passed (the imports under way then finish)."""
        latencies, server, failures = [], [], []
        lock = threading.Lock()
        deadline = time.monotonic() + self.small_seconds

        def client_loop():
            client = KeepAliveClient(ASSETD_JOBS_PORT, headers)
            try:
                while time.monotonic() < deadline:
                    seconds, job = self.import_one(client, "small.bin", "small.bin")
                    queued = datetime.datetime.fromisoformat(job["created_at"].replace("Z", "+00:00"))
                    done = datetime.datetime.fromisoformat(job["updated_at"].replace("Z", "+00:00"))
                    with lock:
                        latencies.append(seconds)
                        server.append((done - queued).total_seconds())
            except Exception as error:  # reported below
                with lock:
                    failures.append(error)

        started = time.monotonic()
        threads = [threading.Thread(target=client_loop) for _ in range(IMPORT_CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=self.small_seconds + IMPORT_TIMEOUT_SECONDS + 60)
        elapsed = time.monotonic() - started
        if failures or any(thread.is_alive() for thread in threads):
            raise RuntimeError(f"small imports: {len(failures)} failed, first: {failures[:1] or 'still running'}")
        return {
            "imports": len(latencies),
            "rate": len(latencies) / elapsed,
            "p50_ms": percentile(latencies, 50) * 1000,
            "p99_ms": percentile(latencies, 99) * 1000,
            "server_p50_ms": percentile(server, 50) * 1000,
            "server_p99_ms": percentile(server, 99) * 1000,
        }

    def check_imports_recorded(self):
        """Every job the bench asked for succeeded, each made one asset, with one attempt
        (retries would mean failed attempts: reported, not hidden)."""
        counts = dict(
            line.split("|")
            for line in self.psql("SELECT status || '|' || count(*) FROM jobs GROUP BY status").splitlines()
            if line
        )
        retried = int(self.psql("SELECT count(*) FROM jobs WHERE attempts > 1"))
        imported = int(self.psql("SELECT count(*) FROM events WHERE type = 'AssetImported'"))
        self.results["imports recorded"] = {"jobs": counts, "jobs_with_retries": retried, "assets_imported": imported}
        succeeded = int(counts.get("succeeded", 0))
        if set(counts) != {"succeeded"} or succeeded != imported:
            raise RuntimeError(f"imports: jobs {counts}, {imported} assets imported")
        if retried:
            log(f"imports: {retried} jobs needed more than one attempt")

    def bench_replay(self):
        total = self.replay_events
        log(f"replay: generating {total} events")
        self.generate_events(total)
        count = int(self.psql("SELECT count(*) FROM events"))
        rates = []
        for round_number in range(self.rounds):
            started = time.monotonic()
            result = run([self.binary, "replay"], 1800, env=self.env)
            seconds = time.monotonic() - started
            rates.append(count / seconds)
            log(f"replay round {round_number + 1}/{self.rounds}: {count} events in {seconds:.2f} s ({rates[-1]:.0f}/s) {result.stdout.strip()}")
        self.results["replay"] = {"unit": "events/s", "events": count, "assetd": summary(rates)}

    def generate_events(self, total):
        """Adds about `total` events shaped like real ones: each kind's template is an
        event that assetd itself recorded (upload, rename, delete, session), with the
        ids varied."""
        status, body = self.request(
            "POST",
            f"http://127.0.0.1:{ASSETD_ACCEL_PORT}/file/api/assets",
            {
                "Authorization": f"OpenTera {self.user_token}",
                "Content-Type": "multipart/form-data; boundary=b",
            },
            (
                '--b\r\nContent-Disposition: form-data; name="file_asset"\r\n\r\n'
                f'{{"id_session": {SESSION}, "asset_name": "template.txt", "tags": ["bench"]}}\r\n'
                '--b\r\nContent-Disposition: form-data; name="file"; filename="template.txt"\r\n\r\nhello\r\n--b--\r\n'
            ).encode(),
        )
        if status != 200:
            raise RuntimeError(f"template upload: {status} {body[:300]}")
        template = json.loads(body)["asset_uuid"]
        status, body = self.request(
            "POST",
            f"http://127.0.0.1:{ASSETD_ACCEL_PORT}/file/api/assets/infos",
            {"Authorization": f"OpenTera {self.user_token}", "Content-Type": "application/json"},
            json.dumps({"file_asset": {"asset_uuid": template, "asset_original_filename": "renamed.txt"}}).encode(),
        )
        if status != 200:
            raise RuntimeError(f"template rename: {status} {body[:300]}")
        self.delete_asset(template)
        existing = int(self.psql("SELECT count(*) FROM events"))
        sessions = max(10, total // 100)
        remaining = max(0, total - existing - sessions)
        uploads = remaining * 60 // 100
        renames = remaining * 25 // 100
        deletes = remaining - uploads - renames
        # Deterministic uuids per index so renames and deletes name uploaded assets.
        self.psql(
            f"""
            INSERT INTO events (stream, version, id, type, data, metadata)
            SELECT 'session-' || (1000000 + i), 1, gen_random_uuid(), t.type,
                   t.data || jsonb_build_object('id_session', 1000000 + i, 'session_uuid', gen_random_uuid()),
                   t.metadata
            FROM generate_series(1, {sessions}) i,
                 (SELECT type, data, metadata FROM events WHERE stream = 'session-{SESSION}' AND version = 1) t;
            INSERT INTO events (stream, version, id, type, data, metadata)
            SELECT 'asset-' || u, 1, gen_random_uuid(), t.type,
                   t.data || jsonb_build_object('asset_uuid', u, 'id_session', 1000000 + (i % {sessions}) + 1),
                   t.metadata
            FROM (SELECT i, md5('bench' || i)::uuid AS u FROM generate_series(1, {uploads}) i) s,
                 (SELECT type, data, metadata FROM events WHERE stream = 'asset-{template}' AND version = 1) t;
            INSERT INTO events (stream, version, id, type, data, metadata)
            SELECT 'asset-' || u, 2, gen_random_uuid(), t.type, t.data || jsonb_build_object('asset_uuid', u), t.metadata
            FROM (SELECT i, md5('bench' || i)::uuid AS u FROM generate_series(1, {renames}) i) s,
                 (SELECT type, data, metadata FROM events WHERE stream = 'asset-{template}' AND version = 2) t;
            INSERT INTO events (stream, version, id, type, data, metadata)
            SELECT 'asset-' || u, 3, gen_random_uuid(), t.type, t.data || jsonb_build_object('asset_uuid', u), t.metadata
            FROM (SELECT i, md5('bench' || i)::uuid AS u FROM generate_series(1, {deletes}) i) s,
                 (SELECT type, data, metadata FROM events WHERE stream = 'asset-{template}' AND version = 3) t;
            """,
            timeout=1800,
        )
        self.psql("VACUUM ANALYZE events", timeout=1800)

    # ----- report -----

    def machine(self):
        memory = int(re.search(r"MemTotal:\s+(\d+)", open("/proc/meminfo").read()).group(1)) // 1024
        cpu = re.search(r"model name\s+:\s+(.*)", open("/proc/cpuinfo").read())
        disk = run(["df", "-hT", self.work], 10).stdout.splitlines()[-1].split()
        return {
            "cores": os.cpu_count(),
            "cpu": cpu.group(1) if cpu else platform.processor(),
            "memory_mib": memory,
            "disk": f"{disk[0]} {disk[1]} {disk[2]}",
            "kernel": platform.release(),
            "nginx": run(["nginx", "-v"], 10).stderr.strip(),
            "postgres": run(["psql", "-qtAw", self.database_url, "-c", "SHOW server_version"], 10).stdout.strip(),
        }

    def report(self):
        lines = ["", "| measurement | assetd (median, min–max) | nginx (median, min–max) | ratio |", "|---|---|---|---|"]
        for name, r in self.results.items():
            extra = ""
            if "assetd_p99_ms" in r:
                extra = f"; p50 {r['assetd_p50_ms']['median']:.1f} ms, p99 {r['assetd_p99_ms']['median']:.1f} ms ({r['assetd_p99_ms']['min']:.1f}–{r['assetd_p99_ms']['max']:.1f})"
            if "nginx_p50_ms" in r:
                extra += f"; nginx p50 {r['nginx_p50_ms']['median']:.2f} ms"
            if "server_p99_ms" in r:
                extra += f"; as recorded: p50 {r['server_p50_ms']['median']:.1f} ms, p99 {r['server_p99_ms']['median']:.1f} ms"
            if "ratio" in r:
                verdict = ""
                if "target_ratio" in r:
                    met = "met" if r["ratio"] >= r["target_ratio"] else "**missed**"
                    verdict = f" (target ≥ {r['target_ratio']}×: {met})"
                lines.append(
                    f"| {name} | {fmt(r['assetd'])} {r['unit']}{extra} | {fmt(r['nginx'])} {r['unit']} | {r['ratio']:.2f}×{verdict} |"
                )
            elif "reference" in r:
                lines.append(f"| {name} (reference) | {fmt(r['reference'])} {r['unit']} | | |")
            elif "assetd" in r and "events" in r:
                lines.append(f"| {name} ({r['events']} events) | {fmt(r['assetd'])} {r['unit']} | | |")
            elif "assetd" in r:
                lines.append(f"| {name} | {fmt(r['assetd'])} {r['unit']}{extra} | | |")
            elif "value" in r and "target" in r:
                verdict = "met" if r["value"] <= r["target"] else "**missed**"
                lines.append(f"| {name} | {r['value']:.1f} {r['unit']} (target ≤ {r['target']} {r['unit']}: {verdict}) | | |")
            elif "value" in r and r.get("unit") == "×":
                lines.append(f"| {name} | {r['value']:.2f}× | | |")
            elif "value" in r:
                lines.append(f"| {name} | {r['value']:.1f} {r['unit']} | | |")
            else:
                lines.append(f"| {name} | {json.dumps(r)} | | |")
        print("\n".join(lines))
        out = os.path.join(ROOT, "var", "bench")
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, f"results-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
        with open(path, "w") as f:
            json.dump(
                {
                    "command": sys.argv,
                    "commit": git_commit(),
                    "parameters": {
                        "rounds": self.rounds,
                        "large_file_mib": self.large_size // MIB,
                        "small_upload_seconds": self.small_seconds,
                        "small_upload_size": 4096,
                        "small_upload_connections": 32,
                        "replay_events": self.replay_events,
                        "import_concurrency": self.args.import_concurrency,
                        "import_clients": IMPORT_CLIENTS,
                        "import_poll_ms": IMPORT_POLL_SECONDS * 1000,
                        "allocator": self.args.allocator,
                    },
                    "machine": self.machine(),
                    "results": self.results,
                },
                f,
                indent=2,
            )
        print(f"\nallocator: {self.args.allocator}\nimport concurrency: {self.args.import_concurrency}\nmachine: {json.dumps(self.machine())}\nresults: {path}")


class KeepAliveClient:
    """HTTP/1.1 to one assetd over one kept-alive connection (the import clients' many
    small requests would otherwise each cost a connection). GETs are retried once on a
    new connection when the kept one was closed; POSTs never are."""

    def __init__(self, port, headers):
        self.port = port
        self.headers = headers
        self.conn = None
        self.used = 0.0

    def request(self, method, path, body=None, headers=None, retry=False):
        # A POST is never sent on a connection that sat idle (the server may be closing it).
        if not retry and time.monotonic() - self.used > 1:
            self.close()
        for attempt in range(2 if retry else 1):
            self.used = time.monotonic()
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            try:
                self.conn.request(method, path, body=body, headers={**self.headers, **(headers or {})})
                response = self.conn.getresponse()
                data = response.read()
                if response.will_close:
                    self.close()
                return response.status, data
            except (http.client.HTTPException, OSError):
                self.close()
                if attempt == 1 or not retry:
                    raise
        raise AssertionError("unreachable")

    def get(self, path):
        return self.request("GET", path, retry=True)

    def post_json(self, path, value):
        return self.request("POST", path, json.dumps(value).encode(), {"Content-Type": "application/json"})

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def percentile(values, p):
    """The nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, -(-len(ordered) * p // 100) - 1))]


def git_commit():
    """The commit measured, with `-dirty` when the tree has uncommitted changes."""
    try:
        commit = run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], 10).stdout.strip()
        dirty = run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"], 10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except Exception:  # not a git checkout
        return "unknown"


def rotated(items, round_number):
    """The items, in an order that moves on by one each round: each goes first, second and
    so on in turn (the opentera row's three transfers), so none always follows the same one."""
    shift = round_number % len(items)
    return items[shift:] + items[:shift]


def free_port():
    """A loopback port nobody listens on now (for the opentera row's Redis and stand-in)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def redis_command(port, *args):
    """One Redis command over RESP; the answer's first line (`+OK`, `+PONG` without the
    sign). Enough for PING and MSET."""
    request = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = str(arg).encode()
        request += f"${len(data)}\r\n".encode() + data + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request)
        answer = b""
        while not answer.endswith(b"\r\n"):
            chunk = conn.recv(4096)
            if not chunk:
                break
            answer += chunk
    line = answer.decode().strip()
    if not line.startswith("+"):
        raise RuntimeError(f"redis {args[0]}: {line}")
    return line[1:]


def hs256(key, claims):
    """A JWT signed as OpenTera signs its tokens (HS256, the key's text as secret)."""
    def b64(data):
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + b"." + b64(json.dumps(claims).encode())
    signature = hmac.new(key.encode(), signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + b64(signature)).decode()


def cpu_seconds(pid):
    """User and system CPU time of a process, all its threads, so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu():
    """(idle, total) jiffies of all cores since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return values[3] + values[4], sum(values[:8])


def ports_free():
    """Refuses to start when one of our ports is taken (a killed run's leftovers, say):
    a health check would otherwise be answered by the wrong process."""
    import socket

    for port in [ASSETD_ACCEL_PORT, ASSETD_PLAIN_PORT, ASSETD_JOBS_PORT, ASSETD_S3_PORT, ASSETD_OT_PORT, NGINX_ACCEL_PORT,
                 NGINX_PLAIN_PORT, NGINX_OT_PORT, NGINX_BASELINE_PORT]:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                sys.exit(
                    f"bench: 127.0.0.1:{port} is already in use (a previous run's assetd or nginx?); "
                    f"see: ss -ltnp 'sport = :{port}'"
                )


def pgbench():
    """pgbench from PATH, else the newest PostgreSQL's (Debian keeps it off PATH)."""
    found = shutil.which("pgbench")
    if found:
        return found
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"), key=lambda p: int(p.split("/")[4]))
    if not candidates:
        raise RuntimeError("pgbench not found (Debian package postgresql-contrib or postgresql)")
    return candidates[-1]


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def fmt(s):
    return f"{s['median']:.0f} ({s['min']:.0f}–{s['max']:.0f})"


def main():
    global ASSETD_ACCEL_PORT, ASSETD_PLAIN_PORT, ASSETD_JOBS_PORT, ASSETD_S3_PORT, ASSETD_OT_PORT
    global NGINX_ACCEL_PORT, NGINX_PLAIN_PORT, NGINX_OT_PORT, NGINX_BASELINE_PORT
    global DATABASE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", required=True, help="the release assetd binary (scripts/bench passes it)")
    parser.add_argument("--quick", action="store_true", help="small sizes and short runs (under 2 minutes)")
    parser.add_argument("--only", default=",".join(STEPS), help=f"comma-separated subset of: {','.join(STEPS)}")
    parser.add_argument("--rounds", type=int, default=None, help="target/baseline pairs per comparison (default 3)")
    parser.add_argument("--work-dir", default="/var/tmp/assetd-bench", help="where files go (default %(default)s)")
    parser.add_argument(
        "--database-server",
        default=os.environ.get("ASSETD_TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432"),
        help="PostgreSQL server where the --database is dropped and created "
        "(default: $ASSETD_TEST_DATABASE_URL or %(default)s)",
    )
    parser.add_argument(
        "--port-offset",
        type=int,
        default=0,
        help="added to each port the bench listens on (4142-4146, 4180-4182, 4190; the opentera row's Redis and "
        "TeraServer stand-in take free ports), "
        "to run beside another bench (use another --work-dir and --database too)",
    )
    parser.add_argument(
        "--allocator",
        default="jemalloc",
        help="scripts/bench builds assetd with this allocator: jemalloc (the shipped one), mimalloc "
        "or system (glibc's); recorded in the results",
    )
    parser.add_argument(
        "--import-concurrency",
        type=int,
        default=IMPORT_CONCURRENCY,
        help="ASSETD_IMPORT_CONCURRENCY of the import row's assetd (default %(default)s; assetd's own default is 4)",
    )
    parser.add_argument("--database", default=DATABASE, help="the database dropped and created (default %(default)s)")
    args = parser.parse_args()
    ASSETD_ACCEL_PORT += args.port_offset
    ASSETD_PLAIN_PORT += args.port_offset
    ASSETD_JOBS_PORT += args.port_offset
    ASSETD_S3_PORT += args.port_offset
    ASSETD_OT_PORT += args.port_offset
    NGINX_OT_PORT += args.port_offset
    NGINX_ACCEL_PORT += args.port_offset
    NGINX_PLAIN_PORT += args.port_offset
    NGINX_BASELINE_PORT += args.port_offset
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", args.database):
        parser.error("--database: lower-case letters, digits and '_'")
    DATABASE = args.database
    if args.rounds is None:
        args.rounds = 3
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.large_mib = 128 if args.quick else 1024
    args.small_seconds = 3 if args.quick else 20
    args.replay_events = 50_000 if args.quick else 1_000_000
    only = set(args.only.split(","))
    unknown = only - set(STEPS)
    if unknown:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))} (choose from {','.join(STEPS)})")
    ports_free()
    bench = Bench(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        bench.setup()
        steps = [
            ("import", bench.bench_import),
            ("archive", bench.bench_archive),
            ("upload", bench.bench_large_upload),
            ("download", bench.bench_large_download),
            ("range", bench.bench_ranges),
            ("signed", bench.bench_signed),
            ("s3", bench.bench_s3),
            ("small", bench.bench_small_uploads),
            ("opentera", bench.bench_opentera),
            ("pgbench", bench.bench_pgbench),
            ("memory", bench.bench_memory),
            ("aborted", bench.bench_aborted_uploads),
            ("replay", bench.bench_replay),
        ]
        for name, step in steps:
            if name in only:
                # One phase's writeback must not land in the next one's measurements.
                os.sync()
                step()
        bench.report()
    finally:
        bench.stop()
        # This run's files stay until the next run has measured (see Bench.setup);
        # delete them by hand with: rm -rf /var/tmp/assetd-bench*
        for leftover in getattr(bench, "leftovers", []):
            shutil.rmtree(leftover, ignore_errors=True)


if __name__ == "__main__":
    main()
