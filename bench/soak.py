#!/usr/bin/env python3
"""Soak run: mixed traffic with upstream faults for a fixed time, watching sluice for growth.

Starts the built mock upstream and sluice on loopback, then for `--seconds` drives chat
(JSON and streams), embeddings and responses requests from several threads, some clients
hanging up mid-stream, while the mock is told every few seconds to fail in one of its ways
(429s, 500s, connections closed after the request, streams reset, delays). Every 5 s it
samples sluice's RSS and open descriptors, its queue depth and in-flight gauge, and prints
a row. It fails (exit 1) when:
  - RSS grows: over the second half by more than `--rss-slope` MiB a minute (least squares)
    AND at the end (traffic stopped) more than `--rss-margin` MiB above its warm-up peak
    (the highest sample of the first third),
  - descriptors grow: by more than `--fd-slope` a minute over the second half AND at the
    end (traffic stopped) more than `--fd-margin` above their warm-up peak,
  - sluice dies, or a request gets no HTTP answer at all (a lost request),
  - requests are still in flight or queued once traffic stops.
It ends with one `summary:` line: RSS start/peak/end and slope, descriptors start/end and
slope, requests sent/answered/lost, and the error answers by status.

Why both conditions: a 2-minute debug run is still warming up in its second half. Its live
heap (counted by wrapping the allocator) grows ~3 MiB over the first ~2.5 minutes, then
stays flat to the end of a 5-minute run, and the allocator (mimalloc, on transparent huge
pages) takes memory from the OS in 2 MiB steps. Measured on 2 cores: the 2-minute run ends
4 to 7 MiB above its warm-up peak (up to 11 MiB at its own peak) with a slope of +4 to +8
MiB/min, while a 10-minute run peaks at 2 minutes and then falls back. A slope alone reads
that as a leak. A leak does both: 4 KiB per request leaked on purpose ends the 2-minute run
~38 MiB above its warm-up peak, 64 KiB per request ~380 MiB, and one descriptor leaked per
50 requests ends it ~90 descriptors above.

    python3 bench/soak.py --seconds 1800     # by hand: 30 minutes (make soak)
    python3 bench/soak.py --seconds 120      # CI's bounded form (make test-soak)

Standard library only. Targets 127.0.0.1 only; stops by itself.
"""

import argparse
import http.client
import json
import os
import random
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from load import start  # noqa: E402

KEY = "sk-soak-acme-00000000000000000000000"
FAULTS = [
    {"kind": "rate_limit", "resource": "requests", "retry_after": True},
    {"kind": "status", "status": 500},
    {"kind": "close_connection"},
    {"kind": "stream_reset", "after_events": 2},
    {"kind": "delay", "ms": 300},
    {"kind": "insufficient_quota"},
]


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def metric(text, name):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def is_error(kind):
    """An answer that is not the one asked for: an error status, or a stream broken mid-way."""
    return kind == "broken_stream" or (isinstance(kind, int) and kind >= 400)


def slope_per_minute(samples):
    """Least-squares slope of (seconds, value) samples, per minute."""
    n = len(samples)
    if n < 3:
        return 0.0
    mx = sum(t for t, _ in samples) / n
    my = sum(v for _, v in samples) / n
    var = sum((t - mx) ** 2 for t, _ in samples)
    if var == 0:
        return 0.0
    return 60 * sum((t - mx) * (v - my) for t, v in samples) / var


class Traffic:
    def __init__(self, host, port, until):
        self.host, self.port, self.until = host, port, until
        self.lock = threading.Lock()
        self.sent = 0
        self.answers = {}

    def count(self, key):
        with self.lock:
            self.answers[key] = self.answers.get(key, 0) + 1

    def one(self, rng):
        with self.lock:
            self.sent += 1
        kind = rng.choice(["chat", "stream", "stream_hangup", "embeddings", "responses"])
        if kind == "embeddings":
            path, body = "/v1/embeddings", {"model": "text-embedding-3-small", "input": ["soak"] * rng.randint(1, 8)}
        elif kind == "responses":
            path, body = "/v1/responses", {"model": "gpt-4o-mini", "input": "Say hello.", "max_output_tokens": 16}
        else:
            path = "/v1/chat/completions"
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi " * rng.randint(1, 200)}],
                    "max_tokens": 16, "stream": kind != "chat"}
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            try:
                conn.request("POST", path, json.dumps(body), {
                    "authorization": f"Bearer {KEY}", "content-type": "application/json", "x-sluice-max-wait": "5"})
                response = conn.getresponse()
            except (http.client.HTTPException, OSError):
                # No status line at all: the request was lost.
                self.count("lost")
                return
            if kind == "stream_hangup":
                response.read(64)
                conn.sock.close()
                self.count("hung_up")
                return
            response.read()
            self.count(response.status)
        except (http.client.HTTPException, OSError):
            # The mock's faults break streams mid-way by design (sluice ends them with an
            # error event, the SDK raises); the head had arrived.
            self.count("broken_stream")
        finally:
            conn.close()

    def worker(self, seed):
        rng = random.Random(seed)
        while time.monotonic() < self.until:
            self.one(rng)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--release", action="store_true", help="use target/release (default target/debug)")
    parser.add_argument("--rss-slope", type=float, default=1.0, help="MiB per minute allowed over the second half")
    parser.add_argument("--rss-margin", type=float, default=16.0,
                        help="MiB the end may exceed the warm-up peak by (while the slope is also too steep)")
    parser.add_argument("--fd-slope", type=float, default=2.0, help="descriptors per minute allowed over the second half")
    parser.add_argument("--fd-margin", type=int, default=10,
                        help="descriptors the end may exceed the warm-up peak by (while the slope is also too steep)")
    args = parser.parse_args()
    build = ROOT / "target" / ("release" if args.release else "debug")
    failures = []
    with tempfile.TemporaryDirectory(prefix="sluice-soak-") as tmp:
        workdir = Path(tmp)
        config = workdir / "sluice.toml"
        # Two workers whatever the machine, as when `--rss-margin` was measured: each worker
        # has its own allocator heap and upstream pool, so the warm-up grows with their number.
        config.write_text(
            "[server]\nworkers = 2\n"
            "[retry]\nbackoff_base_secs = 0.05\nquota_cooldown_secs = 1\n"
            f'[[org]]\nname = "acme"\nkeys = ["{KEY}"]\n[org.limits."*"]\nrpm = 6000\ntpm = 10000000\n'
        )
        mock, mock_addr = start([build / "mock-openai", "--listen", "127.0.0.1:0", "--chunk-delay-ms", "5"],
                                "stdout", workdir / "mock.log")
        sluice, sluice_addr = start(
            [build / "sluice", "--listen", "127.0.0.1:0", "--upstream", f"http://{mock_addr}", "--config", str(config)],
            "stderr", workdir / "sluice.log", env={"RUST_LOG": "info,sluice::access=warn"},
        )
        host, port = sluice_addr.split(":")
        # Before any traffic: what sluice holds idle.
        samples = [(0.0, rss_mib(sluice.pid), fds(sluice.pid), 0.0, 0.0)]
        began = time.monotonic()
        traffic = Traffic(host, int(port), began + args.seconds)
        threads = [threading.Thread(target=traffic.worker, args=(i,), daemon=True) for i in range(args.threads)]
        for thread in threads:
            thread.start()
        rng = random.Random(7)
        print(f"{'t':>6} {'rss MiB':>8} {'fds':>5} {'queued':>6} {'in flight':>9} {'answers':>8} {'errors':>7}",
              flush=True)
        try:
            while time.monotonic() < began + args.seconds:
                fault = rng.choice(FAULTS)
                rule = json.dumps({"fault": fault, "times": rng.randint(1, 5)}).encode()
                urllib.request.urlopen(urllib.request.Request(
                    f"http://{mock_addr}/_mock/faults", rule, {"content-type": "application/json"}), timeout=10).read()
                time.sleep(5)
                if sluice.poll() is not None:
                    failures.append("sluice exited")
                    break
                text = urllib.request.urlopen(f"http://{sluice_addr}/metrics", timeout=30).read().decode()
                now = time.monotonic() - began
                row = (now, rss_mib(sluice.pid), fds(sluice.pid), metric(text, "sluice_queue_depth"),
                       metric(text, "sluice_requests_in_flight"))
                samples.append(row)
                with traffic.lock:
                    answered = sum(traffic.answers.values())
                    errors = sum(n for kind, n in traffic.answers.items() if is_error(kind))
                print(f"{row[0]:6.0f} {row[1]:8.1f} {row[2]:5d} {row[3]:6.0f} {row[4]:9.0f} {answered:8d} {errors:7d}",
                      flush=True)
            for thread in threads:
                thread.join(timeout=90)
            time.sleep(2)
            text = urllib.request.urlopen(f"http://{sluice_addr}/metrics", timeout=30).read().decode()
            in_flight, queued = metric(text, "sluice_requests_in_flight"), metric(text, "sluice_queue_depth")
            if in_flight + queued:
                failures.append(f"{in_flight + queued:.0f} requests still in flight or queued after the traffic stopped")
            print(f"after the traffic: in flight {in_flight:.0f}, queued {queued:.0f}, "
                  f"buckets {metric(text, 'sluice_buckets'):.0f}, "
                  f"client connections {metric(text, 'sluice_connections_open'):.0f}")
            end_rss, end_fds = rss_mib(sluice.pid), fds(sluice.pid)
        finally:
            for proc in (sluice, mock):
                proc.terminate()
                try:
                    proc.wait(timeout=40)
                except Exception:
                    proc.kill()
    warm_up = [row for row in samples if row[0] <= args.seconds / 3]
    second_half = samples[len(samples) // 2:]
    rss_slope = slope_per_minute([(t, rss) for t, rss, *_ in second_half])
    fd_slope = slope_per_minute([(t, n) for t, _, n, *_ in second_half])
    rss_warm_peak = max(rss for _, rss, *_ in warm_up)
    fd_warm_peak = max(n for _, _, n, *_ in warm_up)
    rss_peak = max([end_rss] + [rss for _, rss, *_ in samples])
    lost = traffic.answers.get("lost", 0)
    errors = " ".join(f"{kind}={n}" for kind, n in sorted(traffic.answers.items(), key=str) if is_error(kind))
    print(f"answers: {dict(sorted(traffic.answers.items(), key=str))}")
    print(f"summary: rss MiB start {samples[0][1]:.1f} peak {rss_peak:.1f} end {end_rss:.1f} "
          f"(warm-up peak {rss_warm_peak:.1f}), slope {rss_slope:+.2f} MiB/min; "
          f"fds start {samples[0][2]} end {end_fds} (warm-up peak {fd_warm_peak}), slope {fd_slope:+.1f}/min; "
          f"requests sent {traffic.sent} answered {traffic.sent - lost} lost {lost}; "
          f"errors {errors or 'none'}")
    if lost:
        failures.append(f"{lost} requests got no answer at all")
    if rss_slope > args.rss_slope and end_rss > rss_warm_peak + args.rss_margin:
        failures.append(f"RSS grows {rss_slope:.2f} MiB/min over the second half (allowed {args.rss_slope}) and ends "
                        f"{end_rss - rss_warm_peak:.1f} MiB above its warm-up peak (allowed {args.rss_margin})")
    if fd_slope > args.fd_slope and end_fds > fd_warm_peak + args.fd_margin:
        failures.append(f"descriptors grow {fd_slope:.1f}/min over the second half (allowed {args.fd_slope}) and end "
                        f"{end_fds - fd_warm_peak} above their warm-up peak (allowed {args.fd_margin})")
    if failures:
        print("FAIL: " + "; ".join(failures))
        sys.exit(1)
    print("no growth, nothing lost")


if __name__ == "__main__":
    main()
