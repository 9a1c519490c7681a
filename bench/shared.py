#!/usr/bin/env python3
"""Many replicas, one budget (run by hand, not in CI).

Starts a redis-server of its own, the release mock upstream enforcing a quantized limit (a
240 RPM org held as 4 per second, as the real service does), and N release sluice replicas
configured with that org's limit, then sends one burst through the official openai SDK
(retries off) spread round-robin over the replicas, starting together. Reports, for the same
burst with and without the shared store: requests that succeeded, the 429s the upstream sent
(each counts against the org's real quota), and when the last request was answered against
the ideal schedule (the limit's first minute's worth at once, then its refill).

    .venv/bin/python bench/shared.py [--skip-build] [--runs 3x60,5x100]

Needs redis-server (Debian package) and the test virtualenv (`make venv`). Targets 127.0.0.1
only; every burst is bounded.
"""

import argparse
import asyncio
import json
import multiprocessing
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from load import RELEASE, free_port, start  # noqa: E402

import openai  # noqa: E402

KEY = "sk-shared-acme-000000000000000000000"
RPM = 240
MESSAGES = [{"role": "user", "content": "Reply with one word."}]


def start_redis(workdir):
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=open(workdir / "redis.log", "w"), stderr=subprocess.STDOUT,
    )
    for _ in range(200):
        try:
            import socket
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, port
        except OSError:
            time.sleep(0.025)
    proc.kill()
    sys.exit("redis-server did not start")


def one_client(base, count, begin):
    """`count` concurrent SDK requests to `base` from `begin` on: (ok, done at)."""

    async def go():
        async with openai.AsyncOpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=120) as client:
            async def one():
                try:
                    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
                    return True, time.time()
                except openai.APIError:
                    return False, time.time()

            await asyncio.sleep(max(0.0, begin - time.time()))
            return await asyncio.gather(*(one() for _ in range(count)))

    return asyncio.run(go())


def run(replicas, count, redis_port, workdir):
    name = f"{replicas}x{count}-{'shared' if redis_port else 'alone'}"
    config = workdir / f"{name}.toml"
    shared = f'[shared]\nredis_url = "redis://127.0.0.1:{redis_port}/{replicas}"\n\n' if redis_port else ""
    config.write_text(f'{shared}[[org]]\nname = "acme"\nkeys = ["{KEY}"]\n[org.limits."*"]\nrpm = {RPM}\n')
    mock, mock_addr = start(
        [RELEASE / "mock-openai", "--listen", "127.0.0.1:0", "--rpm", str(RPM), "--tpm", "100000000",
         "--quantum-ms", "1000"],
        "stdout", workdir / f"{name}-mock.log",
    )
    sluices = [
        start(
            [RELEASE / "sluice", "--listen", "127.0.0.1:0", "--upstream", f"http://{mock_addr}", "--config", str(config)],
            "stderr", workdir / f"{name}-sluice-{i}.log", env={"RUST_LOG": "info,sluice::access=warn"},
        )
        for i in range(replicas)
    ]
    try:
        # Replicas see each other's heartbeats (one a second) before the burst.
        time.sleep(2.5)
        begin = time.time() + 1.0
        shares = [count // replicas + (1 if i < count % replicas else 0) for i in range(replicas)]
        with multiprocessing.Pool(replicas) as pool:
            results = pool.starmap(
                one_client, [(f"http://{addr}/v1", n, begin) for (_, addr), n in zip(sluices, shares)]
            )
        results = [r for share in results for r in share]
        with urllib.request.urlopen(f"http://{mock_addr}/_mock/stats", timeout=10) as response:
            stats = json.loads(response.read())
    finally:
        for proc, _ in [*sluices, (mock, None)]:
            proc.terminate()
            proc.wait(timeout=10)
    succeeded = sum(1 for ok, _ in results if ok)
    elapsed = max(done for _, done in results) - begin
    # Ideal: the limit's burst (4 at once, quantized) then the refill at 4 per second.
    schedule = max(0.0, (count - RPM / 60) / (RPM / 60))
    print(f"| {replicas} | {count} | {'yes' if redis_port else 'no'} | {succeeded}/{count} | "
          f"{stats['status_counts'].get('429', 0)} | {stats['requests']} | {elapsed:.2f} s | "
          f"{schedule:.2f} s | {elapsed / schedule:.3f}x |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--runs", default="3x60,5x100", help="replicas x requests, comma-separated")
    args = parser.parse_args()
    if not args.skip_build:
        subprocess.run(["cargo", "build", "--release", "--workspace", "--bins"], cwd=ROOT, check=True)
    workdir = Path(tempfile.mkdtemp(prefix="sluice-shared-"))
    redis, redis_port = start_redis(workdir)
    print(f"logs: {workdir}\n")
    print("| replicas | requests | shared | succeeded | upstream 429s | upstream received | last answered | ideal | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    try:
        for spec in args.runs.split(","):
            replicas, count = (int(x) for x in spec.split("x"))
            run(replicas, count, redis_port, workdir)
            run(replicas, count, None, workdir)
    finally:
        redis.terminate()
        redis.wait(timeout=10)


if __name__ == "__main__":
    main()
