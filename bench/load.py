#!/usr/bin/env python3
"""Load benchmark for sluice's forwarding path (run by hand, not in CI).

Starts the mock upstream (with limits far above the load), sluice in front of it, and nginx
in front of the same mock as the pure-proxy reference, then drives each with wrk: ~1 KB chat
completion requests at 50 connections (throughput) and at 1 connection (added latency).
Everything targets 127.0.0.1, and every run is bounded by --duration.

    python3 bench/load.py [--duration 8] [--rounds 3] [--latency-duration 4] [--latency-rounds 7]
                          [--skip-build] [--sluice-arg=--config=FILE ...] [--scrape-interval 1]
                          [--baseline OLD/sluice] [--redis-url redis://127.0.0.1:6379/0]

With --baseline, a second sluice binary (an older build) runs against the same mock and is
measured in the same rounds, so a change is compared side by side rather than across runs.

With --redis-url, a second sluice with the same arguments shares its buckets through that
Redis, measured in the same rounds: the cost of the shared store (one admission round trip
per request, one settlement round trip off the request's path).

With --scrape-interval, sluice is measured a second time in each round while a scraper
fetches its /metrics every that many seconds (as Prometheus would), to show what scraping
costs the requests.

Latency is measured first, in short runs, the targets in turn with the order rotated each
round; then throughput, interleaved the same way. Latency goes first because on a burstable
VM the throughput runs (both cores saturated for minutes) get the CPU throttled by the host
(steal time), and latency rounds run after them would measure the throttling more than the
proxies; the share of stolen CPU time in each phase is printed, to judge a run by. Each figure is the
median over the rounds, and the added latency of a proxy is the median of its per-round
differences with the mock measured in the same round: on a shared 2-core machine a single
run can be off by 30%, and slow drifts of the host would otherwise land on one target.

Needs wrk and nginx (installed with apt-get when missing, as root).
"""

import argparse
import os
import re
import shutil
import statistics
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The binaries under test; SLUICE_RELEASE_DIR runs another build (an older commit's, side by side).
RELEASE = Path(os.environ.get("SLUICE_RELEASE_DIR") or ROOT / "target" / "release")
LISTENING = re.compile(r"listening on http://([0-9.]+:\d+)")


def ensure_tools():
    missing = [pkg for tool, pkg in (("wrk", "wrk"), ("nginx", "nginx-light")) if not shutil.which(tool)]
    if missing:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True)


def start(args, stream, log_path, env=None, timeout=20):
    """Starts a server that prints 'listening on http://ADDR' within `timeout` seconds;
    returns (process, addr)."""
    log = open(log_path, "w")
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE if stream == "stdout" else log,
        stderr=subprocess.PIPE if stream == "stderr" else log,
        text=True,
        env={**os.environ, **(env or {})},
    )
    pipe = proc.stdout if stream == "stdout" else proc.stderr
    found = {}
    ready = threading.Event()

    def pump():
        for line in pipe:
            log.write(line)
            match = LISTENING.search(line)
            if match and "addr" not in found:
                found["addr"] = match.group(1)
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(timeout):
        proc.kill()
        sys.exit(f"{args[0]} did not start; see {log_path}")
    return proc, found["addr"]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_nginx(upstream, workdir):
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"""
worker_processes auto;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {workdir}/nginx-access.log;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    upstream mock {{ server {upstream}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""
    )
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(workdir)])
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("nginx did not start")


UNITS = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}


def wrk(addr, connections, duration):
    threads = min(2, connections)
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency",
         "-s", str(ROOT / "bench" / "chat.lua"), f"http://{addr}"],
        check=True, capture_output=True, text=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {}
    for pct in ("50", "99"):
        value, unit = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out).groups()
        lat[pct] = float(value) * UNITS[unit]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    if non2xx or errors:
        print(f"  warning for {addr}: {non2xx.group(0) if non2xx else ''} {errors.group(0) if errors else ''}")
    return rps, lat


class Scraper:
    """Fetches http://addr/metrics every `interval` seconds while running."""

    def __init__(self, addr, interval):
        self.addr, self.interval = addr, interval
        self.stop = threading.Event()
        self.scrapes, self.bytes = 0, 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            with urllib.request.urlopen(f"http://{self.addr}/metrics", timeout=5) as response:
                self.bytes = len(response.read())
            self.scrapes += 1
            self.stop.wait(self.interval)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def cpu_times():
    """The machine's CPU time counters (/proc/stat), or None where there are none."""
    try:
        with open("/proc/stat") as stat:
            return [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def stolen_share(before, after):
    """The share of CPU time the hypervisor stole between two cpu_times() readings."""
    if not before or not after or len(before) < 8:
        return None
    delta = [b - a for a, b in zip(before, after)]
    total = sum(delta[:8])
    return delta[7] / total if total else None


def median_run(runs):
    """The median requests/s and the median of each latency percentile over the rounds."""
    rps = statistics.median(r for r, _ in runs)
    lat = {pct: statistics.median(l[pct] for _, l in runs) for pct in ("50", "99")}
    return rps, lat


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=8, help="seconds per throughput run (50 connections)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds; medians are reported")
    parser.add_argument("--latency-duration", type=int, default=4, help="seconds per latency run (1 connection)")
    parser.add_argument("--latency-rounds", type=int, default=7, help="interleaved latency rounds")
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--sluice-arg", action="append", default=[], help="extra argument for sluice")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="also measure this sluice binary (an older build, say), side by side")
    parser.add_argument("--redis-url", default=None,
                        help="also measure sluice sharing its buckets through this Redis (same "
                             "--sluice-arg; use a config with limits, e.g. bench/admission.toml)")
    parser.add_argument("--scrape-interval", type=float, default=None,
                        help="also measure sluice while /metrics is scraped this often (seconds)")
    args = parser.parse_args()

    ensure_tools()
    if not args.skip_build:
        subprocess.run(["cargo", "build", "--release", "--workspace", "--bins"], cwd=ROOT, check=True)
    workdir = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    procs = []
    try:
        mock, mock_addr = start(
            [RELEASE / "mock-openai", "--listen", "127.0.0.1:0", "--rpm", "1000000000", "--tpm", "1000000000000"],
            "stdout", workdir / "mock.log",
        )
        procs.append(mock)
        sluice, sluice_addr = start(
            [RELEASE / "sluice", "--listen", "127.0.0.1:0", "--upstream", f"http://{mock_addr}", *args.sluice_arg],
            "stderr", workdir / "sluice.log", env={"SLUICE_CONFIG": "", **({"RUST_LOG": os.environ["SLUICE_RUST_LOG"]} if "SLUICE_RUST_LOG" in os.environ else {})},
        )
        procs.append(sluice)
        nginx, nginx_addr = start_nginx(mock_addr, workdir)
        procs.append(nginx)

        targets = {"mock (direct)": mock_addr, "nginx": nginx_addr, "sluice": sluice_addr}
        if args.baseline:
            baseline, baseline_addr = start(
                [args.baseline, "--listen", "127.0.0.1:0", "--upstream", f"http://{mock_addr}", *args.sluice_arg],
                "stderr", workdir / "baseline.log", env={"SLUICE_CONFIG": ""},
            )
            procs.append(baseline)
            targets[f"sluice (baseline {args.baseline})"] = baseline_addr
        if args.redis_url:
            shared, shared_addr = start(
                [RELEASE / "sluice", "--listen", "127.0.0.1:0", "--upstream", f"http://{mock_addr}",
                 *args.sluice_arg, "--redis-url", args.redis_url],
                "stderr", workdir / "shared.log", env={"SLUICE_CONFIG": ""},
            )
            procs.append(shared)
            targets["sluice (shared store)"] = shared_addr
        scraped = None
        if args.scrape_interval:
            scraped = f"sluice, /metrics every {args.scrape_interval:g} s"
            targets[scraped] = sluice_addr
        for addr in targets.values():  # warm connection pools
            wrk(addr, 50, 2)
        runs = {name: {"c50": [], "c1": []} for name in targets}
        scrape_bytes = 0
        names = list(targets)

        def measure(name, load, connections, duration):
            nonlocal scrape_bytes
            addr = targets[name]
            if name == scraped:
                with Scraper(addr, args.scrape_interval) as scraper:
                    runs[name][load].append(wrk(addr, connections, duration))
                scrape_bytes = scraper.bytes
            else:
                runs[name][load].append(wrk(addr, connections, duration))

        steal = {}
        before = cpu_times()
        for i in range(args.latency_rounds):
            for name in names[i % len(names):] + names[:i % len(names)]:
                measure(name, "c1", 1, args.latency_duration)
        steal["latency"], before = stolen_share(before, cpu_times()), cpu_times()
        for i in range(args.rounds):
            for name in names[i % len(names):] + names[:i % len(names)]:
                measure(name, "c50", 50, args.duration)
        steal["throughput"] = stolen_share(before, cpu_times())
        results = {name: {load: median_run(r) for load, r in loads.items()} for name, loads in runs.items()}

        def added(name):
            """Per-round p50 differences with the mock at 1 connection: median, min, max."""
            deltas = [own[1]["50"] - direct[1]["50"]
                      for own, direct in zip(runs[name]["c1"], runs["mock (direct)"]["c1"])]
            return statistics.median(deltas), min(deltas), max(deltas)

        print(f"\n~1 KB chat completions; throughput: {args.duration}s runs, median of {args.rounds} rounds; "
              f"latency: {args.latency_duration}s runs, median of {args.latency_rounds} rounds; "
              f"{os.cpu_count()} cores, logs: {workdir}\n")
        print("| target | req/s @50 | p50 @50 | p99 @50 | req/s @1 | p50 @1 | p99 @1 | added p50 @1 (min-max) |")
        print("|---|---|---|---|---|---|---|---|")
        for name, r in results.items():
            (rps50, lat50), (rps1, lat1) = r["c50"], r["c1"]
            if name.startswith("mock"):
                extra = "-"
            else:
                median, low, high = added(name)
                extra = f"{median:.0f} us ({low:.0f} to {high:.0f})"
            print(f"| {name} | {rps50:,.0f} | {lat50['50']:.0f} us | {lat50['99']:.0f} us | "
                  f"{rps1:,.0f} | {lat1['50']:.0f} us | {lat1['99']:.0f} us | {extra} |")
        ratio = results["sluice"]["c50"][0] / results["nginx"]["c50"][0]
        median, low, high = added("sluice")
        if None not in steal.values():
            print(f"\nCPU time stolen by the host: {steal['latency']:.0%} during the latency runs, "
                  f"{steal['throughput']:.0%} during the throughput runs")
        print(f"\nsluice / nginx throughput at 50 connections: {ratio:.2f}x (target >= 0.8x)")
        print(f"sluice added p50 latency at 1 connection: {median / 1000:.3f} ms "
              f"(rounds: {low / 1000:.3f} to {high / 1000:.3f}; target <= 0.2 ms)")
        if scraped:
            plain, busy = results["sluice"], results[scraped]
            print(f"with /metrics scraped every {args.scrape_interval:g} s ({scrape_bytes:,} bytes each): "
                  f"throughput {busy['c50'][0] / plain['c50'][0] - 1:+.1%}, "
                  f"p50 @1 {(busy['c1'][1]['50'] - plain['c1'][1]['50']):+.0f} us, "
                  f"p99 @50 {(busy['c50'][1]['99'] - plain['c50'][1]['99']):+.0f} us")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
