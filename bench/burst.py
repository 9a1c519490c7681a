#!/usr/bin/env python3
"""Burst benchmark for admission control (run by hand, not in CI).

Drives release builds of sluice and the mock upstream (enforcing the same limits) with the
official openai SDK, retries off, and reports for each burst: how long it took against the
schedule the limit allows, whether every request succeeded, how many 429s the upstream sent,
and how long a second org's single request took while the burst was queued.

    .venv/bin/python bench/burst.py [--skip-build]

Needs the test virtualenv (`make venv`). Targets 127.0.0.1 only; every burst is bounded.
"""

import argparse
import asyncio
import json
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
        async def go():
            base = f"http://{sluice_addr}/v1"
            async with openai.AsyncOpenAI(base_url=base, api_key=KEY_A, max_retries=0, timeout=300) as acme, \
                    openai.AsyncOpenAI(base_url=base, api_key=KEY_B, max_retries=0, timeout=300) as other:
                async def one():
                    try:
                        r = await acme.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=max_tokens)
                        return r.usage.prompt_tokens
                    except openai.APIError as err:
                        return err
                started = time.monotonic()
                tasks = [asyncio.create_task(one()) for _ in range(count)]
                await asyncio.sleep(0.5)
                t0 = time.monotonic()
                await other.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=max_tokens)
                other_ms = (time.monotonic() - t0) * 1000
                results = await asyncio.gather(*tasks)
                return time.monotonic() - started, other_ms, results

        elapsed, other_ms, results = asyncio.run(go())
        with urllib.request.urlopen(f"http://{mock_addr}/_mock/stats", timeout=10) as response:
            stats = json.loads(response.read())
    finally:
        for proc in (sluice, mock):
            proc.terminate()
            proc.wait(timeout=10)

    failures = [r for r in results if isinstance(r, Exception)]
    prompt = next((r for r in results if not isinstance(r, Exception)), 0)
    cost = prompt + max_tokens
    # The schedule the limit allows: the bucket starts full, then refills at limit/60 per second.
    by_requests = max(0.0, (count - rpm) / (rpm / 60))
    by_tokens = max(0.0, (count * cost - tpm) / (tpm / 60))
    schedule = max(by_requests, by_tokens)
    ratio = f"{elapsed / schedule:.3f}x" if schedule > 0 else "n/a (fits the bucket)"
    print(f"| {name} | {count} | {rpm} | {tpm} | {cost} | {schedule:.1f} s | {elapsed:.2f} s | {ratio} | "
          f"{count - len(failures)}/{count} | {stats['status_counts'].get('429', 0)} | {other_ms:.1f} ms |")


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
    print("| burst | requests | RPM | TPM | tokens each | schedule | took | took/schedule | succeeded | upstream 429s | other org's request |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    run_burst("rpm-200", 600, 10_000_000, 200, short, 5, workdir)
    run_burst("rpm-700", 600, 10_000_000, 700, short, 5, workdir)
    run_burst("tpm-120", 10_000, 120_000, 120, long, 100, workdir)


if __name__ == "__main__":
    main()
