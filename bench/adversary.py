#!/usr/bin/env python3
"""The adversarial-client run: sluice attacked as a hostile client would attack it.

Starts the built mock upstream and sluice on loopback, then runs each attack in turn while a
probe times `/healthz` on fresh connections, and asserts the bounds sluice promises
(docs/reliability.md):

  slowloris      connections that dribble header lines are closed by the header-read timeout
  slow-body      bodies sent a byte a second are cut by the body timeout
  idle           keep-alive connections left idle are closed by the idle timeout
  half-close     a request followed by shutdown(SHUT_WR) is still answered, and run once
  paths          every spelling of the chat path is metered (rpm = 2: at most 2 reach upstream)
  bucket-flood   made-up keys beyond the bucket cap never switch admission off for a
                 configured org
  label-flood    many (org, model) pairs keep /metrics bounded
  queued         N requests queued at once: RSS per queued request, all returned on close

It prints one line of figures per attack and exits non-zero when a bound does not hold.

    python3 bench/adversary.py            # the issue's sizes (by hand: a few minutes)
    python3 bench/adversary.py --ci       # smaller counts, bounded to about a minute
    python3 bench/adversary.py --release  # against target/release

Uses the standard library only. Targets 127.0.0.1 only; every attack is bounded in time.
"""

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from load import start  # noqa: E402

KEY = "sk-adversary-acme-000000000000000000"
VICTIM = "sk-adversary-victim-0000000000000000000"
SLOW = "sk-adversary-slow-0000000000000000000"
HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 2.0
# hyper's header-read timer runs from the moment a connection waits for a request: it is the
# idle keep-alive timeout too.
IDLE_TIMEOUT = HEADER_TIMEOUT
# Slack for the server's timer granularity and this script's own scheduling on 2 cores.
SLACK = 3.0

CHAT = json.dumps({
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Say hello."}],
    "max_tokens": 5,
})

failures = []


def check(ok, what):
    if not ok:
        failures.append(what)
        print(f"  FAIL: {what}", flush=True)


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def get_json(url):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def get_text(url):
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


class Probe:
    """Times GET /healthz on a fresh connection every 200 ms while an attack runs."""

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.worst = 0.0
        self.failed = 0
        self.task = None

    async def _run(self):
        while True:
            began = time.monotonic()
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 10)
                writer.write(b"GET /healthz HTTP/1.1\r\nhost: probe\r\nconnection: close\r\n\r\n")
                await writer.drain()
                head = await asyncio.wait_for(reader.read(64), 10)
                writer.close()
                if not head.startswith(b"HTTP/1.1 200"):
                    self.failed += 1
            except (OSError, asyncio.TimeoutError):
                self.failed += 1
            self.worst = max(self.worst, time.monotonic() - began)
            await asyncio.sleep(0.2)

    def __enter__(self):
        self.task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc):
        self.task.cancel()


async def held_until_closed(reader, limit):
    """Seconds until the server closed the connection (reading and discarding), or `limit`."""
    began = time.monotonic()
    try:
        while time.monotonic() - began < limit:
            chunk = await asyncio.wait_for(reader.read(4096), limit)
            if not chunk:
                break
    except (OSError, asyncio.TimeoutError):
        pass
    return time.monotonic() - began


async def slowloris(host, port, count):
    async def one():
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            return 0.0
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\n")
        began = time.monotonic()

        async def dribble():
            try:
                for n in range(int(HEADER_TIMEOUT + SLACK) * 2):
                    await asyncio.sleep(1)
                    writer.write(f"x-drip-{n}: y\r\n".encode())
                    await writer.drain()
            except OSError:
                pass

        dripping = asyncio.create_task(dribble())
        await held_until_closed(reader, HEADER_TIMEOUT + 2 * SLACK)
        dripping.cancel()
        writer.close()
        return time.monotonic() - began

    held = await asyncio.gather(*(one() for _ in range(count)))
    return max(held)


async def slow_bodies(host, port, count):
    async def one():
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            return 0.0, b""
        writer.write(
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\nauthorization: Bearer {KEY}\r\n"
            "content-type: application/json\r\ncontent-length: 100000\r\n\r\n{".encode()
        )
        began = time.monotonic()
        answer = bytearray()

        async def drip():
            try:
                for _ in range(60):
                    await asyncio.sleep(1)
                    writer.write(b" ")
                    await writer.drain()
            except OSError:
                pass

        dripping = asyncio.create_task(drip())
        try:
            while time.monotonic() - began < 60:
                chunk = await asyncio.wait_for(reader.read(4096), 60)
                if not chunk:
                    break
                answer.extend(chunk)
        except (OSError, asyncio.TimeoutError):
            pass
        dripping.cancel()
        writer.close()
        return time.monotonic() - began, bytes(answer)

    results = await asyncio.gather(*(one() for _ in range(count)))
    return max(r[0] for r in results), [r[1] for r in results]


async def idle_connections(host, port, count, pid):
    async def one():
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /healthz HTTP/1.1\r\nhost: a\r\n\r\n")
            await writer.drain()
            await reader.readuntil(b"ok\n")
        except (OSError, asyncio.IncompleteReadError):
            return 0.0
        held = await held_until_closed(reader, IDLE_TIMEOUT + 2 * SLACK)
        writer.close()
        return held

    tasks = [asyncio.create_task(one()) for _ in range(count)]
    await asyncio.sleep(1.0)
    peak = rss_mib(pid)
    held = await asyncio.gather(*tasks)
    return max(held), peak


async def half_close(host, port, count):
    complete = 0
    for _ in range(count):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\nauthorization: Bearer {KEY}\r\n"
            f"content-type: application/json\r\nx-sluice-max-wait: 1\r\n"
            f"content-length: {len(CHAT)}\r\n\r\n{CHAT}".encode()
        )
        await writer.drain()
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        # A whole answer: the chat completion, or the 429 of a request acme's 2 rpm had no
        # room for within a second; never a connection cut off.
        if answer.startswith(b"HTTP/1.1 ") and answer.rstrip().endswith(b"}"):
            complete += 1
    return complete


async def raw_post(host, port, target, key, body, headers=""):
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"POST {target} HTTP/1.1\r\nhost: a\r\nauthorization: Bearer {key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n{headers}"
        f"connection: close\r\n\r\n{body}".encode()
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 60)
    writer.close()
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


async def queued(host, port, count, pid):
    """`count` requests queued at once on an org at 1 rpm; RSS while they wait."""
    writers = []
    for _ in range(count):
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            break
        body = CHAT
        writer.write(
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\nauthorization: Bearer {SLOW}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n{body}".encode()
        )
        writers.append((reader, writer))
    await asyncio.sleep(3.0)
    return writers


def config_text(workdir, args):
    # Configured orgs: acme (rpm 2) for paths and half-close, victim (rpm 2) for after the
    # bucket flood, slow (10 rpm) to hold a long queue (10,000 fit in a day's wait).
    org = '[[org]]\nname = "{}"\nkeys = ["{}"]\n[org.limits."*"]\nrpm = {}\ntpm = 100000000\n\n'
    return (
        f"[server]\nheader_read_timeout_secs = {HEADER_TIMEOUT}\nbody_read_timeout_secs = {BODY_TIMEOUT}\n"
        f"[queue]\nmax_wait_secs = 86400\nmax_depth = {args.queued + 1000}\n"
        f"max_depth_per_bucket = {args.queued + 1000}\n{args.bucket_cap_line}\n"
        + org.format("acme", KEY, 2) + org.format("victim", VICTIM, 2) + org.format("slow", SLOW, 10)
    )


async def run(args, sluice_pid, sluice_addr, mock_addr):
    host, port = sluice_addr.split(":")
    port = int(port)
    base = f"http://{sluice_addr}"
    mock_base = f"http://{mock_addr}"
    print(f"idle: RSS {rss_mib(sluice_pid):.1f} MiB, {fds(sluice_pid)} fds", flush=True)

    with Probe(host, port) as probe:
        held = await slowloris(host, port, args.slowloris)
    print(f"slowloris x{args.slowloris}: held at most {held:.1f} s; /healthz worst {probe.worst * 1000:.0f} ms, "
          f"{probe.failed} failed", flush=True)
    check(held <= HEADER_TIMEOUT + SLACK, f"slowloris connections held {held:.1f} s (header timeout {HEADER_TIMEOUT} s)")
    check(probe.failed == 0, "/healthz failed during slowloris")

    with Probe(host, port) as probe:
        held, answers = await slow_bodies(host, port, args.slow_bodies)
    answered = sum(1 for a in answers if a.startswith(b"HTTP/1.1 4"))
    print(f"slow-body x{args.slow_bodies}: held at most {held:.1f} s, {answered} answered 4xx; "
          f"/healthz worst {probe.worst * 1000:.0f} ms, {probe.failed} failed", flush=True)
    check(held <= args.body_bound, f"slow bodies held {held:.1f} s (bound {args.body_bound} s)")
    check(probe.failed == 0, "/healthz failed during slow bodies")

    with Probe(host, port) as probe:
        held, peak = await idle_connections(host, port, args.idle, sluice_pid)
    print(f"idle x{args.idle}: held at most {held:.1f} s, RSS peak {peak:.1f} MiB, after "
          f"{rss_mib(sluice_pid):.1f} MiB; /healthz worst {probe.worst * 1000:.0f} ms", flush=True)
    check(held <= IDLE_TIMEOUT + SLACK, f"idle connections held {held:.1f} s (idle timeout {IDLE_TIMEOUT} s)")

    before = get_json(f"{mock_base}/_mock/stats")["requests"]
    complete = await half_close(host, port, args.half_close)
    sent = get_json(f"{mock_base}/_mock/stats")["requests"] - before
    print(f"half-close x{args.half_close}: {complete} answered whole, upstream received {sent}", flush=True)
    # acme is at 2 rpm: at most 2 are admitted at once; the others wait their turn or time out
    # with a 429, but every one is answered whole and none is sent twice.
    check(complete == args.half_close, f"half-close: {complete} of {args.half_close} answered whole")
    check(sent <= args.half_close, f"half-close: upstream received {sent} for {args.half_close} requests")

    # Paths, bucket and label floods run on fresh budget: acme's 2 rpm may be spent above.
    await asyncio.sleep(0)
    before = get_json(f"{mock_base}/_mock/stats")["requests"]
    spellings = ["/v1/chat/completions/", "/v1/chat//completions", "/v1/./chat/completions",
                 "/v1/chat/../chat/completions", "/v1/chat/completion%73", "/V1/chat/completions",
                 "/v1/chat/completions;x", "//v1/chat/completions"] * 2
    statuses = [await raw_post(host, port, s, KEY, CHAT, "x-sluice-max-wait: 0.2\r\n") for s in spellings]
    sent = get_json(f"{mock_base}/_mock/stats")["requests"] - before
    print(f"paths x{len(spellings)}: upstream received {sent}; statuses {sorted(set(statuses))}", flush=True)
    check(sent <= 2, f"paths: {sent} non-canonical requests reached the upstream on an rpm = 2 org")

    began = time.monotonic()
    keys = [f"sk-flood-{i:08d}-000000000000000000000" for i in range(args.bucket_flood)]
    sem = asyncio.Semaphore(64)

    async def flood(key, model):
        async with sem:
            body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
            try:
                return await raw_post(host, port, "/v1/chat/completions", key, body)
            except (OSError, asyncio.TimeoutError):
                return 0

    await asyncio.gather(*(flood(k, "gpt-4o-mini") for k in keys))
    flood_secs = time.monotonic() - began
    # A configured org that has spent nothing yet: 6 tries, at most its 2 rpm through.
    before = get_json(f"{mock_base}/_mock/stats")["requests"]
    statuses = [await raw_post(host, port, "/v1/chat/completions", VICTIM, CHAT, "x-sluice-max-wait: 0.2\r\n")
                for _ in range(6)]
    sent = get_json(f"{mock_base}/_mock/stats")["requests"] - before
    print(f"bucket-flood x{args.bucket_flood} keys in {flood_secs:.1f} s: then victim (rpm 2) got {sent} of 6 "
          f"through; RSS {rss_mib(sluice_pid):.1f} MiB", flush=True)
    check(sent <= 2, f"bucket flood: {sent} of 6 requests reached the upstream on an rpm = 2 org")

    began = time.monotonic()
    pairs = [(f"sk-label-{i:05d}-0000000000000000000000", f"model-{j}")
             for i in range(args.label_orgs) for j in range(args.label_models)]
    await asyncio.gather(*(flood(k, m) for k, m in pairs))
    scrape_began = time.monotonic()
    text = get_text(f"{base}/metrics")
    scrape = time.monotonic() - scrape_began
    series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    print(f"label-flood {len(pairs)} pairs in {time.monotonic() - began:.1f} s: /metrics {len(text) / 1e6:.2f} MB, "
          f"{series} series, scraped in {scrape * 1000:.0f} ms; RSS {rss_mib(sluice_pid):.1f} MiB", flush=True)
    check(series <= args.max_series, f"label flood: {series} series (bound {args.max_series})")

    idle_rss = rss_mib(sluice_pid)
    writers = await queued(host, port, args.queued, sluice_pid)
    status = get_json(f"{base}/status")
    depth = sum(b["queue"]["interactive"] + b["queue"]["batch"] for b in status["buckets"])
    loaded = rss_mib(sluice_pid)
    per = (loaded - idle_rss) * 1024 / max(depth, 1)
    print(f"queued {len(writers)} sent, {depth} waiting: RSS {idle_rss:.1f} -> {loaded:.1f} MiB "
          f"({per:.1f} KiB each), {fds(sluice_pid)} fds", flush=True)
    check(depth >= len(writers) * 0.9 - 2, f"queued: only {depth} of {len(writers)} waiting")
    for _, writer in writers:
        writer.close()
    await asyncio.sleep(3.0)
    status = get_json(f"{base}/status")
    depth = sum(b["queue"]["interactive"] + b["queue"]["batch"] for b in status["buckets"])
    print(f"  after the clients left: {depth} waiting, {fds(sluice_pid)} fds", flush=True)
    check(depth == 0, f"queued: {depth} still waiting after every client left")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ci", action="store_true", help="smaller counts, about a minute")
    parser.add_argument("--release", action="store_true", help="use target/release (default target/debug)")
    args = parser.parse_args()
    full = not args.ci
    args.slowloris = 1000 if full else 200
    args.slow_bodies = 300 if full else 50
    args.idle = 2000 if full else 300
    args.half_close = 20 if full else 5
    args.bucket_flood = 11000 if full else 1500
    # With --ci the bucket cap is lowered so the flood passes it in seconds.
    args.bucket_cap_line = "" if full else "max_buckets = 1000\n"
    args.label_orgs, args.label_models = (200, 100) if full else (40, 25)
    args.max_series = 20000
    args.queued = 10000 if full else 1000
    args.body_bound = BODY_TIMEOUT + SLACK

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    build = ROOT / "target" / ("release" if args.release else "debug")
    with tempfile.TemporaryDirectory(prefix="sluice-adversary-") as tmp:
        workdir = Path(tmp)
        config = workdir / "sluice.toml"
        config.write_text(config_text(workdir, args))
        mock, mock_addr = start([build / "mock-openai", "--listen", "127.0.0.1:0"], "stdout", workdir / "mock.log")
        sluice, sluice_addr = start(
            [build / "sluice", "--listen", "127.0.0.1:0", "--upstream", f"http://{mock_addr}", "--config", str(config)],
            "stderr", workdir / "sluice.log", env={"RUST_LOG": "info,sluice::access=warn"},
        )
        try:
            asyncio.run(run(args, sluice.pid, sluice_addr, mock_addr))
            check(sluice.poll() is None, "sluice exited during the run")
        finally:
            for proc in (sluice, mock):
                proc.terminate()
                try:
                    proc.wait(timeout=40)
                except Exception:
                    proc.kill()
            if failures:
                print((workdir / "sluice.log").read_text()[-3000:])
    if failures:
        print(f"{len(failures)} bound(s) did not hold: " + "; ".join(failures))
        sys.exit(1)
    print("every bound held")


if __name__ == "__main__":
    main()
