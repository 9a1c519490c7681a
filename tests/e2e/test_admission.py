"""Admission control end to end: the official SDK (retries off) bursting through sluice into
a mock upstream that enforces the same limits sluice is configured with."""

import asyncio
import time

import openai
import pytest

from conftest import MOCK_BIN, SLUICE_BIN, Process, control

KEY_A = "sk-e2e-acme-000000000000000000000000"
KEY_B = "sk-e2e-other-00000000000000000000000"


def config(tmp_path, rpm, tpm):
    """Two orgs with the same limits, one key each, and the default queueing (60 s)."""
    path = tmp_path / "sluice.toml"
    path.write_text(
        "".join(
            f'[[org]]\nname = "{name}"\nkeys = ["{key}"]\n[org.limits."*"]\nrpm = {rpm}\ntpm = {tpm}\n\n'
            for name, key in (("acme", KEY_A), ("other", KEY_B))
        )
    )
    return path


@pytest.fixture
def limited(tmp_path):
    """Starts a mock with the given limits and sluice configured with the same ones."""
    started = []

    def start(rpm, tpm):
        mock = Process([MOCK_BIN, "--listen", "127.0.0.1:0", "--rpm", str(rpm), "--tpm", str(tpm)], stream="stdout")
        started.append(mock)
        sluice = Process(
            [SLUICE_BIN, "--listen", "127.0.0.1:0", "--upstream", mock.url, "--config", str(config(tmp_path, rpm, tpm))],
            env={"RUST_LOG": "info,sluice::access=warn"},
        )
        started.append(sluice)
        return mock, sluice

    yield start
    for process in reversed(started):
        assert process.stop() == 0


def async_client(sluice, key):
    return openai.AsyncOpenAI(base_url=sluice.url + "/v1", api_key=key, max_retries=0, timeout=120)


async def burst(client, count, messages, max_tokens):
    async def one():
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=messages, max_tokens=max_tokens
        )
        return int(raw.headers["x-sluice-queue-ms"]), raw.parse()

    return await asyncio.gather(*(one() for _ in range(count)))


def no_upstream_429(mock):
    stats = control(mock, "/_mock/stats")
    assert stats["rate_limited"] == 0, stats["status_counts"]
    assert "429" not in stats["status_counts"], stats["status_counts"]
    return stats


@pytest.mark.parametrize("count", [200, 700])
def test_a_burst_at_600_rpm_all_succeeds_without_upstream_429s(limited, count):
    mock, sluice = limited(600, 10_000_000)
    messages = [{"role": "user", "content": "Reply with one word."}]

    async def run():
        async with async_client(sluice, KEY_A) as acme, async_client(sluice, KEY_B) as other:
            task = asyncio.create_task(burst(acme, count, messages, 5))
            await asyncio.sleep(0.2)
            # Another org's request during the burst is not queued behind it.
            raw = await other.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=messages, max_tokens=5
            )
            assert raw.headers["x-sluice-queue-ms"] == "0"
            return await task

    results = asyncio.run(run())
    assert len(results) == count
    assert all(r.choices[0].message.content for _, r in results)
    stats = no_upstream_429(mock)
    assert stats["requests"] == count + 1
    queued = sum(1 for waited, _ in results if waited > 0)
    if count > 600:
        # More than the bucket holds: the excess waited in sluice instead of failing upstream.
        assert queued >= count - 600 - 20, queued


def test_a_tpm_bound_burst_of_long_prompts_all_succeeds(limited):
    mock, sluice = limited(10_000, 120_000)
    prose = "Rate limits are enforced per organization and per model over rolling windows. " * 90
    messages = [{"role": "system", "content": "Summarize."}, {"role": "user", "content": prose}]

    async def run():
        async with async_client(sluice, KEY_A) as acme:
            return await burst(acme, 120, messages, 100)

    results = asyncio.run(run())
    assert all(r.usage.prompt_tokens > 1000 for _, r in results)
    # ~1,100 tokens each against 120,000 per minute: some had to wait for tokens.
    assert sum(1 for waited, _ in results if waited > 0) > 0
    no_upstream_429(mock)


def test_rejections_are_rate_limit_errors_the_sdk_understands(limited):
    mock, sluice = limited(600, 1_000)
    client = openai.OpenAI(base_url=sluice.url + "/v1", api_key=KEY_A, max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=5_000
        )
    assert caught.value.code == "request_too_large"
    assert caught.value.response.headers["x-should-retry"] == "false"

    for _ in range(2):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=400)
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=400,
            extra_headers={"x-sluice-max-wait": "1"},
        )
    assert time.monotonic() - started < 5, "rejected at once, not after waiting"
    assert caught.value.code == "rate_limit_exceeded"
    assert float(caught.value.response.headers["retry-after-ms"]) > 1000
    assert control(mock, "/_mock/stats")["requests"] == 2
