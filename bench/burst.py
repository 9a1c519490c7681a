#!/usr/bin/env python3
"""Burst benchmark for admission control (run by hand, not in CI).

Drives release builds of sluice and the mock upstream (enforcing the same limits) with the
official openai SDK, retries off, from several client processes starting together, and
reports for each burst: when its last request was admitted (sent + x-sluice-queue-ms) and
answered, against the schedule the limit allows; whether every request succeeded; how many
429s the upstream sent; and how long a second org's single request (timed by curl, in its own
process) took half a second into the burst.

    .venv/bin/python bench/burst.py [--skip-build]

Needs the test virtualenv (`make venv`). Targets 127.0.0.1 only; every burst is bounded.
"""

import argparse
import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from load import RELEASE, start  # noqa: E402

import openai  # noqa: E402

KEY_A = "sk-burst-acme-0000000000000000000000"
KEY_B = "sk-burst-other-000000000000000000000"


def run_burst(name, rpm, tpm, count, messages, max_tokens, workdir):
    config = workdir / f"{name}.toml"
    config.write_text(
        "".join(
            f'[[org]]\nname = "{org}"\nkeys = ["{key}"]\n[org.limits."*"]\nrpm = {rpm}\ntpm = {tpm}\n\n'
            for org, key in (("acme", KEY_A), ("other", KEY_B))
        )
    )
    mock, mock_addr = start(
        [RELEASE / "mock-openai", "--listen", "127.0.0.1:0", "--rpm", str(rpm), "--tpm", str(tpm)],
        "stdout", workdir / f"{name}-mock.log",
    )
    sluice, sluice_addr = start(
        [RELEASE / "sluice", "--listen", "127.0.0.1:0", "--upstream", f"http://{mock_addr}", "--config", str(config)],
        "stderr", workdir / f"{name}-sluice.log", env={"RUST_LOG": "info,sluice::access=warn"},
    )
    try:
        base = f"http://{sluice_addr}/v1"
        begin = time.time() + 2.0  # every client process starts sending at this moment
        shares = [count // CLIENTS + (1 if i < count % CLIENTS else 0) for i in range(CLIENTS)]
        with multiprocessing.Pool(CLIENTS) as pool:
            pending = pool.starmap_async(client_share, [(base, n, messages, max_tokens, begin) for n in shares])
            # Another org's single request, half a second into the burst, timed by curl in its
            # own process so the burst's client load does not distort it.
            time.sleep(max(0.0, begin + 0.5 - time.time()))
            body = json.dumps({"model": "gpt-4o-mini", "messages": messages, "max_tokens": max_tokens})
            probe = subprocess.run(
                ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", f"{base}/chat/completions",
                 "-H", f"authorization: Bearer {KEY_B}", "-H", "content-type: application/json", "-d", body],
                capture_output=True, text=True, check=True,
            ).stdout.split()
            other_status, other_ms = probe[0], float(probe[1]) * 1000
            results = [r for share in pending.get(timeout=600) for r in share]
        elapsed = max(r[1] for r in results) - begin
        admitted = max(r[0] + r[2] / 1000 for r in results if r[2] is not None) - begin
        with urllib.request.urlopen(f"http://{mock_addr}/_mock/stats", timeout=10) as response:
            stats = json.loads(response.read())
    finally:
        for proc in (sluice, mock):
            proc.terminate()
            proc.wait(timeout=10)

    failures = [r for r in results if r[2] is None]
    cost = max(r[3] for r in results) + max_tokens
    # The schedule the limit allows: the bucket starts full, then refills at limit/60 per second.
    by_requests = max(0.0, (count - rpm) / (rpm / 60))
    by_tokens = max(0.0, (count * cost - tpm) / (tpm / 60))
    schedule = max(by_requests, by_tokens)

    def ratio(seconds):
        return f"{seconds / schedule:.3f}x" if schedule > 0 else "n/a"

    print(f"| {name} | {count} | {rpm} | {tpm} | {cost} | {schedule:.1f} s | {admitted:.2f} s ({ratio(admitted)}) | "
          f"{elapsed:.2f} s ({ratio(elapsed)}) | {count - len(failures)}/{count} | "
          f"{stats['status_counts'].get('429', 0)} | {other_status} in {other_ms:.1f} ms |")


CLIENTS = 4


def client_share(base, count, messages, max_tokens, begin):
    """One client process: `count` concurrent SDK requests from `begin` on. Returns, per
    request, (sent at, done at, x-sluice-queue-ms or None on failure, prompt tokens)."""

    async def go():
        async with openai.AsyncOpenAI(base_url=base, api_key=KEY_A, max_retries=0, timeout=300) as acme:
            async def one():
                sent = time.time()
                try:
                    raw = await acme.chat.completions.with_raw_response.create(
                        model="gpt-4o-mini", messages=messages, max_tokens=max_tokens
                    )
                    usage = raw.parse().usage
                    return sent, time.time(), int(raw.headers["x-sluice-queue-ms"]), usage.prompt_tokens
                except openai.APIError:
                    return sent, time.time(), None, 0

            await asyncio.sleep(max(0.0, begin - time.time()))
            return await asyncio.gather(*(one() for _ in range(count)))

    return asyncio.run(go())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-build", action="store_true")
    args = parser.parse_args()
    if not args.skip_build:
        subprocess.run(["cargo", "build", "--release", "--workspace", "--bins"], cwd=ROOT, check=True)
    workdir = Path(tempfile.mkdtemp(prefix="sluice-burst-"))
    short = [{"role": "user", "content": "Reply with one word."}]
    prose = "Rate limits are enforced per organization and per model over rolling windows. " * 90
    long = [{"role": "system", "content": "Summarize."}, {"role": "user", "content": prose}]
    print(f"logs: {workdir}\n")
    print("| burst | requests | RPM | TPM | tokens each | schedule | last admitted | last answered | succeeded | upstream 429s | other org's request |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    run_burst("rpm-200", 600, 10_000_000, 200, short, 5, workdir)
    run_burst("rpm-700", 600, 10_000_000, 700, short, 5, workdir)
    run_burst("tpm-120", 10_000, 120_000, 120, long, 100, workdir)


if __name__ == "__main__":
    main()
