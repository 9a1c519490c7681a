"""Hot reload through the real binary: SIGHUP puts an edited config file in force for the
SDK's next request; a broken file is rejected, logged by key path, and the old config keeps
serving; without a config file SIGHUP does not end the process."""

import os
import signal
import time
import urllib.request

import openai
import pytest

from conftest import start_mock, start_sluice

KEY = "sk-e2e-reload-0123456789abcdef012345"


def config(rpm, extra=""):
    # Watching is off: only SIGHUP reloads here (tests/reload.rs covers file watching).
    return (
        "[server]\nconfig_watch_secs = 0\n\n"
        f'[[org]]\nname = "acme"\nkeys = ["{KEY}"]\n[org.limits."*"]\nrpm = {rpm}\n{extra}'
    )


def reloads(sluice, result):
    with urllib.request.urlopen(sluice.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    series = f'sluice_config_reloads_total{{result="{result}"}} '
    return next(float(line[len(series):]) for line in text.splitlines() if line.startswith(series))


def wait_for(what, check, timeout=20):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def chat(client, max_wait=None):
    headers = {"x-sluice-max-wait": str(max_wait)} if max_wait is not None else None
    return client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=5,
        extra_headers=headers,
    )


@pytest.fixture
def running(tmp_path):
    path = tmp_path / "sluice.toml"
    path.write_text(config(2))
    mock = start_mock()
    sluice = start_sluice(mock.url, config=path)
    client = openai.OpenAI(base_url=sluice.url + "/v1", api_key=KEY, max_retries=0)
    yield path, sluice, client
    assert sluice.stop() == 0
    mock.stop()
    assert not any(KEY in line for line in sluice.lines), "the API key reached the log"


def test_sighup_puts_new_limits_in_force(running):
    path, sluice, client = running
    chat(client)
    chat(client)
    # 2 rpm are spent: a request that will not wait a second is refused by sluice.
    with pytest.raises(openai.RateLimitError):
        chat(client, max_wait=1)

    path.write_text(config(600))
    os.kill(sluice.proc.pid, signal.SIGHUP)
    wait_for("the reload", lambda: reloads(sluice, "ok") == 1)
    assert chat(client, max_wait=1).choices[0].message.content
    # Log lines reach stderr in batches, within 25 ms.
    wait_for("the reload's log line", lambda: any("configuration reloaded" in line for line in sluice.lines))


def test_a_broken_file_is_rejected_and_the_old_config_keeps_serving(running):
    path, sluice, client = running
    path.write_text(config(600))
    os.kill(sluice.proc.pid, signal.SIGHUP)
    wait_for("the first reload", lambda: reloads(sluice, "ok") == 1)

    path.write_text(config(1, extra="burst = 5\n"))
    os.kill(sluice.proc.pid, signal.SIGHUP)
    wait_for("the rejected reload", lambda: reloads(sluice, "error") == 1)
    wait_for("the rejection's log line", lambda: any("reload rejected" in line for line in sluice.lines))
    rejected = [line for line in sluice.lines if "reload rejected" in line]
    # The log names the offending key by its path.
    assert any('org[0].limits."*"' in line or "org[0].limits.*" in line for line in rejected), rejected
    # Still 600 rpm, not 1: three in a row without waiting.
    for _ in range(3):
        assert chat(client, max_wait=1).choices[0].message.content


def test_sighup_without_a_config_file_does_not_stop_sluice():
    mock = start_mock()
    sluice = start_sluice(mock.url)
    os.kill(sluice.proc.pid, signal.SIGHUP)
    wait_for("the log line", lambda: any("nothing to reload" in line for line in sluice.lines))
    assert sluice.proc.poll() is None
    with urllib.request.urlopen(sluice.url + "/readyz", timeout=10) as response:
        assert response.status == 200
    assert sluice.stop() == 0
    mock.stop()
