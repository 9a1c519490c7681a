#!/usr/bin/env python3
"""Instructions per request, counted by callgrind (run by hand, not in CI).

A count, not a time: it does not move with the load on a shared machine, so it compares two
builds of sluice (before and after a change) where wall-clock benchmarks cannot. Starts the
release mock upstream (natively) and sluice under `valgrind --tool=callgrind` with one worker,
sends a warm-up, zeroes the counters, sends N ~1 KB chat completions (the same body as
bench/chat.lua) one after another on one keep-alive connection, and divides the instructions
callgrind counted by N. The count includes everything sluice's process does for them: hyper's
server and client, estimation, admission, the access line on its own thread.

    python3 bench/instructions.py [--requests 2000] [--sluice target/release/sluice]
                                  [--baseline OLD/sluice] [--config bench/admission.toml]

With --baseline, the older binary is counted the same way after the first, and both are
printed. Targets 127.0.0.1 only; needs valgrind (Debian package valgrind).
"""

import argparse
import http.client
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from load import RELEASE, start  # noqa: E402

KEY = "sk-bench-0123456789abcdef"
CONTENT = "The quick brown fox jumps over the lazy dog. " * 20
BODY = json.dumps({
    "model": "gpt-4o-mini",
    "max_tokens": 16,
    "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": CONTENT}],
}, separators=(",", ":"))


def send(addr, count):
    host, port = addr.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    for _ in range(count):
        conn.request("POST", "/v1/chat/completions", BODY,
                     {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            sys.exit(f"sluice answered {response.status}")
    conn.close()


def totals(path):
    """The instruction total of a callgrind dump."""
    for line in path.read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    sys.exit(f"no totals in {path}")


def count(binary, mock_addr, config, requests, workdir, label):
    out = workdir / f"callgrind.{label}.out"
    # Under callgrind sluice takes a while to start (the tokenizer tables).
    proc, addr = start(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", str(binary),
         "--config", str(config), "--listen", "127.0.0.1:0", "--upstream", f"http://{mock_addr}"],
        "stderr", workdir / f"sluice.{label}.log", env={"SLUICE_CONFIG": ""}, timeout=600,
    )
    try:
        send(addr, 50)  # warm-up: pools, caches, the first bucket
        subprocess.run(["callgrind_control", "--zero", str(proc.pid)], check=True, capture_output=True)
        started = time.monotonic()
        send(addr, requests)
        elapsed = time.monotonic() - started
        before = set(workdir.glob(f"callgrind.{label}.out*"))
        subprocess.run(["callgrind_control", "--dump", str(proc.pid)], check=True, capture_output=True)
        deadline = time.monotonic() + 60
        while not (set(workdir.glob(f"callgrind.{label}.out*")) - before):
            if time.monotonic() > deadline:
                sys.exit("callgrind wrote no dump")
            time.sleep(0.2)
        time.sleep(1)  # let it finish writing
        # The dump after zeroing holds only the measured requests.
        (dump,) = set(workdir.glob(f"callgrind.{label}.out*")) - before
        return totals(dump) / requests, elapsed
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--sluice", type=Path, default=RELEASE / "sluice")
    parser.add_argument("--baseline", type=Path, default=None, help="an older sluice binary to count too")
    parser.add_argument("--config", type=Path, default=None,
                        help="sluice config (default: one worker, no limits); its workers must be 1")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="sluice-instructions-"))
    config = args.config
    if config is None:
        config = workdir / "sluice.toml"
        config.write_text("[server]\nworkers = 1\n")
    mock, mock_addr = start(
        [RELEASE / "mock-openai", "--listen", "127.0.0.1:0", "--rpm", "1000000000", "--tpm", "1000000000000"],
        "stdout", workdir / "mock.log",
    )
    try:
        binaries = [("sluice", args.sluice)] + ([("baseline", args.baseline)] if args.baseline else [])
        print(f"{args.requests} sequential ~1 KB chat completions per binary, 1 worker; logs: {workdir}")
        for label, binary in binaries:
            per_request, elapsed = count(binary, mock_addr, config, args.requests, workdir, label)
            print(f"{label} ({binary}): {per_request:,.0f} instructions per request "
                  f"({elapsed:.1f} s under callgrind)", flush=True)
    finally:
        mock.terminate()
        mock.wait(timeout=10)


if __name__ == "__main__":
    main()
