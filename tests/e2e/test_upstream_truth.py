"""The upstream is the truth: sluice follows what the upstream's headers and errors say when
they disagree with its configuration (or when it has none), when someone else spends the same
organization's budget, when the limit is quantized, when 429s carry no retry-after, and when the
upstream fails. The official SDK runs with max_retries=0, so every success is sluice's doing.

Each test starts its own mock-openai (with the limits under test) and its own sluice, logging at
RUST_LOG=info,sluice=debug; sluice's notable log lines are printed at teardown, which pytest
shows when a test fails. Run with -s to see the measured figures of passing tests too, and set
SLUICE_E2E_LOG_DIR to keep each test's whole sluice log there."""

import asyncio
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from conftest import control, start_mock, start_sluice

KEY_A = "sk-e2e-acme-000000000000000000000000"
KEY_B = "sk-e2e-other-00000000000000000000000"
MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Reply with one word."}]
LOG = "info,sluice=debug"
# The upstream 429s a scenario may see, as a share of the requests the mock received.
MAX_429_SHARE = 0.05
# sluice log lines worth showing: everything but the per-request access lines.
NOTABLE = re.compile(r"429|learn|limit|circuit|burst|retry|quota|cool-down|WARN|ERROR")


def sluice_config(tmp_path, rpm, tpm):
    """One org, `acme`, owning KEY_A, with the same limits for every model."""
    path = tmp_path / "sluice.toml"
    path.write_text(f'[[org]]\nname = "acme"\nkeys = ["{KEY_A}"]\n[org.limits."*"]\nrpm = {rpm}\ntpm = {tpm}\n')
    return path


@pytest.fixture
def stack(tmp_path, request):
    """Starts a mock with the given flags and a sluice in front of it: configured with `limits`
    (rpm, tpm) for KEY_A's org, or with no configuration file when `limits` is None."""
    started = []

    def start(*mock_flags, limits=None):
        mock = start_mock(*mock_flags)
        started.append(mock)
        config = None if limits is None else sluice_config(tmp_path, *limits)
        sluice = start_sluice(mock.url, config, rust_log=LOG)
        started.append(sluice)
        return mock, sluice

    yield start
    codes = [process.stop() for process in reversed(started)]
    for process in started[1::2]:
        print(f"--- sluice log ({len(process.lines)} lines), notable lines:")
        print("\n".join(notable(process)[-80:]))
        if os.environ.get("SLUICE_E2E_LOG_DIR"):
            # The whole log, for whoever investigates a failure.
            path = Path(os.environ["SLUICE_E2E_LOG_DIR"]) / f"{request.node.name}.log"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(process.lines) + "\n")
    assert codes == [0] * len(codes), f"exit codes (sluice, mock, ...): {codes}"
    for process in started[1::2]:
        assert not any(KEY_A in line or KEY_B in line for line in process.lines), "an API key reached the log"


def notable(sluice):
    return [line for line in sluice.lines if "sluice::access" not in line and NOTABLE.search(line)]


def log_tail(sluice, count=25):
    return "\n".join(notable(sluice)[-count:])


@dataclass
class Outcome:
    ok: bool
    seconds: float
    queue_ms: float = 0.0
    error: str = ""


async def burst(sluice, key, count, concurrency, max_tokens=5):
    """`count` chat requests through sluice, at most `concurrency` at a time: each of
    `concurrency` workers sends its next request as soon as the previous one is answered."""
    client = openai.AsyncOpenAI(base_url=sluice.url + "/v1", api_key=key, max_retries=0, timeout=60)
    gate = asyncio.Semaphore(concurrency)

    async def one():
        async with gate:
            started = time.monotonic()
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=MESSAGES, max_tokens=max_tokens
                )
                assert raw.parse().choices[0].message.content
                queued = float(raw.headers.get("x-sluice-queue-ms", "0"))
                return Outcome(True, time.monotonic() - started, queued)
            except openai.APIError as err:
                return Outcome(False, time.monotonic() - started, error=f"{type(err).__name__}: {err}")

    async with client:
        return await asyncio.gather(*(one() for _ in range(count)))


def assert_all_succeeded(results, sluice):
    failures = [r.error for r in results if not r.ok]
    assert not failures, (
        f"{len(failures)} of {len(results)} requests failed through sluice; first ones: {failures[:3]}\n"
        f"sluice:\n{log_tail(sluice)}"
    )


def upstream_429s(mock, sluice, label, elapsed):
    """Prints the scenario's figures and asserts the mock's 429s stay within MAX_429_SHARE of
    the requests it received. Returns the mock's stats."""
    stats = control(mock, "/_mock/stats")
    received = stats["requests"]
    limited = stats["status_counts"].get("429", 0)
    share = limited / received if received else 0.0
    print(
        f"\n[{label}] mock received {received}, upstream 429s {limited} "
        f"(limiter: {stats['rate_limited']}) = {share:.1%}; status counts {stats['status_counts']}; "
        f"burst took {elapsed:.2f} s"
    )
    assert limited <= MAX_429_SHARE * received, (
        f"[{label}] {limited} upstream 429s out of {received} requests the mock received "
        f"({share:.1%} > {MAX_429_SHARE:.0%}); status counts {stats['status_counts']}, "
        f"limiter 429s {stats['rate_limited']}\nsluice:\n{log_tail(sluice)}"
    )
    return stats


def print_allowance(label, served, rpm, window):
    """How much of what the upstream would have served in `window` seconds (its full bucket
    plus its refill) was used. Informative only: the burst's last requests wait for refill."""
    allowance = rpm + rpm * window / 60
    print(f"[{label}] served {served} in {window:.2f} s of an allowance of {allowance:.1f}: {served / allowance:.1%}")


def timed_burst(sluice, key, count, concurrency):
    started = time.monotonic()
    results = asyncio.run(burst(sluice, key, count, concurrency))
    return results, time.monotonic() - started


def test_a_upstream_limit_below_the_configured_one_is_learned(stack):
    # sluice believes 6000 rpm; the upstream allows 120 (a bucket of 120 refilling at 2/s).
    mock, sluice = stack("--rpm", 120, "--tpm", 100_000, limits=(6000, 1_000_000))
    count = 140
    results, elapsed = timed_burst(sluice, KEY_A, count, concurrency=20)
    assert_all_succeeded(results, sluice)
    stats = upstream_429s(mock, sluice, "a: configured 6000 rpm, upstream 120", elapsed)
    assert stats["status_counts"].get("200") == count
    print_allowance("a", count, 120, elapsed)
    # The 20 beyond the upstream's bucket had to wait for its refill (2/s), in sluice.
    assert elapsed > (count - 120) / 2 * 0.8, f"the burst took only {elapsed:.2f} s"
    queued = sum(1 for r in results if r.queue_ms > 0)
    assert queued >= count - 120 - 5, f"only {queued} requests waited in sluice's queue"


def test_b_unconfigured_limits_are_learned_from_a_first_request_alone(stack):
    mock, sluice = stack("--rpm", 120, "--tpm", 100_000)
    count = 130
    # The first request to reach the mock takes 500 ms: meanwhile no other may be sent.
    control(mock, "/_mock/faults", {"fault": {"kind": "delay", "ms": 500}})

    async def run():
        task = asyncio.create_task(burst(sluice, KEY_A, count, concurrency=20))
        await asyncio.sleep(0.3)
        during_probe = await asyncio.to_thread(control, mock, "/_mock/stats")
        return during_probe, await task

    started = time.monotonic()
    during_probe, results = asyncio.run(run())
    elapsed = time.monotonic() - started
    assert during_probe["requests"] == 1, (
        f"{during_probe['requests']} requests reached the upstream while the first one, which "
        f"teaches sluice the limits, was still in flight\nsluice:\n{log_tail(sluice)}"
    )
    assert_all_succeeded(results, sluice)
    stats = upstream_429s(mock, sluice, "b: no configuration, upstream 120 rpm", elapsed)
    assert stats["status_counts"].get("200") == count
    print_allowance("b", count, 120, elapsed)
    assert elapsed > (count - 120) / 2 * 0.8, f"the burst took only {elapsed:.2f} s"


def test_c_another_client_spending_the_same_org_budget(stack):
    # sluice is configured with the upstream's true limit, but it is not alone: another client of
    # the same organization (same key, so the mock bills the same org) takes 30 requests before
    # the burst and keeps spending 3 requests every 3 s during it.
    rpm = 120
    mock, sluice = stack("--rpm", rpm, "--tpm", 1_000_000, limits=(rpm, 1_000_000))
    other = openai.OpenAI(base_url=mock.url + "/v1", api_key=KEY_A, max_retries=0)
    started = time.monotonic()
    orgs = set()
    for _ in range(30):
        raw = other.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=5)
        orgs.add(raw.headers["openai-organization"])
    assert len(orgs) == 1, orgs
    org = orgs.pop()

    stop = threading.Event()
    spent = []

    def spend():
        while not stop.wait(3.0):
            control(mock, "/_mock/spend", {"org": org, "model": MODEL, "requests": 3})
            spent.append((time.monotonic(), 3))

    spender = threading.Thread(target=spend, daemon=True)
    spender.start()
    try:
        count = 100
        results = asyncio.run(burst(sluice, KEY_A, count, concurrency=20))
        ended = time.monotonic()
        stats = control(mock, "/_mock/stats")
    finally:
        stop.set()
        spender.join()
    window = ended - started
    assert_all_succeeded(results, sluice)
    assert {r["org"] for r in stats["received"]} == {org}, "sluice's requests were billed to another org"
    stats = upstream_429s(mock, sluice, "c: another client of the same org", window)

    # The share of the upstream's allowance used in the window, by both clients: what the mock
    # served plus what the other client spent, over the bucket it started with plus its refill.
    served = stats["status_counts"].get("200", 0)
    spent_in_window = sum(n for at, n in spent if at <= ended)
    allowance = rpm + rpm * window / 60
    share = (served + spent_in_window) / allowance
    print(
        f"[c] window {window:.2f} s: served {served} (other client 30, sluice {served - 30}), "
        f"spent by the other client {spent_in_window}; allowance {allowance:.1f} "
        f"({rpm} + {rpm}/min * window); share of the allowance used {share:.1%}"
    )
    assert served == 30 + count
    # sluice neither overran the upstream (the 429 check above) nor left much of it unused.
    assert 0.8 <= share <= 1.05, f"used {share:.1%} of the upstream's allowance\nsluice:\n{log_tail(sluice)}"


def test_d_a_quantized_limit_is_respected_by_a_steady_stream(stack):
    # 600 rpm enforced as 10 per second: the headers describe a bucket of 600, the upstream holds
    # 10. Ten workers keep sending, 120 requests in all (about 12 s at 10/s). sluice sends a
    # second's worth, then one request to prove the rest of the burst; its 429 shows the
    # quantum, and the rest goes at the rate.
    mock, sluice = stack("--rpm", 600, "--quantum-ms", 1000, limits=(600, 10_000_000))
    count = 120
    results, elapsed = timed_burst(sluice, KEY_A, count, concurrency=10)
    assert_all_succeeded(results, sluice)
    stats = upstream_429s(mock, sluice, "d: 600 rpm quantized to 10/s", elapsed)
    assert stats["status_counts"].get("200") == count


def test_e_429s_without_retry_after_wait_for_the_message_or_reset_hint(stack):
    # The mock sends no retry-after / retry-after-ms. sluice knows the true limit, but once it
    # paces at the refill rate another client of the org (same key) asks the upstream what is left
    # and spends all of it and 2 more: the upstream refuses sluice's next request, and only the
    # message's "try again in" (or the reset headers) says how long to wait.
    mock, sluice = stack("--rpm", 120, "--tpm", 1_000_000, "--no-retry-after", limits=(120, 1_000_000))
    other = openai.OpenAI(base_url=mock.url + "/v1", api_key=KEY_A, max_retries=0)
    count = 125

    async def run():
        task = asyncio.create_task(burst(sluice, KEY_A, count, concurrency=20))
        while (await asyncio.to_thread(control, mock, "/_mock/stats"))["requests"] < 100:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        raw = await asyncio.to_thread(
            other.chat.completions.with_raw_response.create, model=MODEL, messages=MESSAGES, max_tokens=5
        )
        left = int(raw.headers["x-ratelimit-remaining-requests"])
        spend = {"org": raw.headers["openai-organization"], "model": MODEL, "requests": left + 2}
        await asyncio.to_thread(control, mock, "/_mock/spend", spend)
        print(f"\n[e] the other client found {left} requests left and spent {left + 2}")
        return await task

    started = time.monotonic()
    results = asyncio.run(run())
    elapsed = time.monotonic() - started
    assert_all_succeeded(results, sluice)
    stats = upstream_429s(mock, sluice, "e: no retry-after", elapsed)
    assert stats["status_counts"].get("200") == count + 1

    pauses = [line for line in sluice.lines if "upstream 429; pausing" in line]
    hints = [match.group(1) for line in pauses if (match := re.search(r'hint="?(\w+)', line))]
    waits = [int(match.group(1)) for line in pauses if (match := re.search(r"wait_ms=(\d+)", line))]
    print(f"[e] sluice paused on {len(pauses)} upstream 429s; hints {hints}; waits (ms) {waits}")
    assert pauses, "the other client's spending did not make the upstream refuse sluice: nothing was tested"
    assert len(hints) == len(pauses), f"cannot read the hint of: {pauses}"
    assert set(hints) <= {"message", "reset"}, (
        f"without retry-after, sluice should wait for the message's 'try again in' or the reset "
        f"headers, not {hints}\n" + "\n".join(pauses)
    )


def test_f_insufficient_quota_is_final_and_answered_from_the_cool_down(stack):
    mock, sluice = stack()
    acme = openai.OpenAI(base_url=sluice.url + "/v1", api_key=KEY_A, max_retries=0)
    other = openai.OpenAI(base_url=sluice.url + "/v1", api_key=KEY_B, max_retries=0)

    def chat(client):
        return client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)

    # Both orgs' buckets exist and every connection is warm before anything is timed.
    chat(acme)
    chat(other)
    before = control(mock, "/_mock/stats")["requests"]
    control(mock, "/_mock/faults", {"fault": {"kind": "insufficient_quota"}})

    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as first:
        chat(acme)
    first_latency = time.monotonic() - started
    after_first = control(mock, "/_mock/stats")
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as second:
        chat(acme)
    second_latency = time.monotonic() - started
    after_second = control(mock, "/_mock/stats")
    print(
        f"\n[f] insufficient_quota reached the SDK in {first_latency * 1000:.1f} ms; "
        f"from the cool-down in {second_latency * 1000:.1f} ms"
    )

    assert first.value.code == "insufficient_quota", first.value.body
    assert first_latency < 0.1, f"the quota error took {first_latency * 1000:.0f} ms to reach the client"
    assert after_first["requests"] == before + 1, "sluice called the upstream again after insufficient_quota"
    assert second.value.code == "insufficient_quota", second.value.body
    assert second_latency < 0.1, f"the cool-down answer took {second_latency * 1000:.0f} ms"
    assert after_second["requests"] == after_first["requests"], "the org in cool-down reached the upstream"

    assert chat(other).choices[0].message.content, "another org is not in cool-down"
    assert control(mock, "/_mock/stats")["requests"] == after_second["requests"] + 1


def test_g_a_503_is_retried_by_sluice(stack):
    mock, sluice = stack()
    control(mock, "/_mock/faults", {"fault": {"kind": "status", "status": 503}})
    client = openai.OpenAI(base_url=sluice.url + "/v1", api_key=KEY_A, max_retries=0)
    started = time.monotonic()
    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
    elapsed = time.monotonic() - started
    assert completion.choices[0].message.content
    stats = control(mock, "/_mock/stats")
    print(f"\n[g] 503 then 200 in {elapsed:.2f} s; status counts {stats['status_counts']}")
    assert stats["requests"] == 2, stats["status_counts"]
    assert stats["status_counts"] == {"503": 1, "200": 1}


def test_h_a_stream_broken_mid_way_raises_in_the_sdk(stack):
    mock, sluice = stack()
    control(mock, "/_mock/faults", {"fault": {"kind": "stream_reset", "after_events": 3}})
    client = openai.OpenAI(base_url=sluice.url + "/v1", api_key=KEY_A, max_retries=0)
    chunks = []
    with pytest.raises(openai.APIError) as caught:
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Count"}], max_tokens=20, stream=True
        )
        for chunk in stream:
            chunks.append(chunk)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    print(
        f"\n[h] {len(chunks)} chunks ({len(text.split())} words) then "
        f"{type(caught.value).__name__}: {caught.value}"
    )
    assert len(text.split()) < 20, "the whole stream arrived"
    stats = control(mock, "/_mock/stats")
    assert stats["requests"] == 1, f"the broken stream was sent {stats['requests']} times"
