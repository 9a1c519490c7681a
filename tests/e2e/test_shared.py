"""Many sidecars, one budget, through the official SDK: three sluice processes sharing a real
redis-server (started here on a free port; .ci/run installs the Debian package, and without it
these tests fail, they do not skip) in front of one mock upstream that enforces a quantized
limit. The SDK runs with max_retries=0, so every success is sluice's doing, and the mock's
counters say what reached the upstream."""

import asyncio
import shutil
import socket
import subprocess
import threading
import time
import urllib.request

import openai
import pytest

from conftest import SLUICE_BIN, Process, control, start_mock

KEY = "sk-e2e-shared-0000000000000000000000"
MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Reply with one word."}]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def redis_url(tmp_path):
    assert shutil.which("redis-server"), "redis-server is needed: apt-get install redis-server"
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.kill()
    proc.wait()


def start_replica(upstream, redis_url):
    """A sluice with no configuration file at all, sharing through SLUICE_REDIS_URL only: what a
    sidecar gets from its pod's environment."""
    return Process(
        [SLUICE_BIN, "--listen", "127.0.0.1:0", "--upstream", upstream],
        env={"RUST_LOG": "info", "SLUICE_CONFIG": "", "SLUICE_REDIS_URL": redis_url},
    )


async def spread(replicas, count):
    """`count` chat requests at once, round-robin over `replicas`: the errors, if any."""
    clients = [
        openai.AsyncOpenAI(base_url=replica.url + "/v1", api_key=KEY, max_retries=0, timeout=90)
        for replica in replicas
    ]

    async def one(client):
        try:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
            return None
        except openai.APIError as err:
            return f"{type(err).__name__}: {err}"

    try:
        return await asyncio.gather(*(one(clients[i % len(clients)]) for i in range(count)))
    finally:
        for client in clients:
            await client.close()


def test_a_burst_spread_over_three_replicas_stays_within_the_shared_limit(redis_url):
    # 240 RPM enforced as 4 per second (quantized, as the real service does): a burst that each
    # replica alone would think fits its own 240 at once.
    mock = start_mock("--rpm", 240, "--quantum-ms", 1000)
    replicas = [start_replica(mock.url, redis_url) for _ in range(3)]
    try:
        # Each replica learns the limit (the first learns it from the headers, the others from
        # the store) with one request.
        for replica in replicas:
            assert asyncio.run(spread([replica], 1)) == [None]
        time.sleep(1.0)
        before = control(mock, "/_mock/stats")
        count = 36
        started = time.monotonic()
        errors = [error for error in asyncio.run(spread(replicas, count)) if error]
        elapsed = time.monotonic() - started
        stats = control(mock, "/_mock/stats")
        received = stats["requests"] - before["requests"]
        limited = stats["status_counts"].get("429", 0) - before["status_counts"].get("429", 0)
        print(f"\n[shared] {count} requests over 3 replicas: {len(errors)} failed, the upstream "
              f"received {received} and refused {limited}, in {elapsed:.1f} s")
        assert not errors, errors[:3]
        # Every request reached the upstream once, plus one re-send per upstream 429: nothing
        # sent twice on sluice's own initiative, nothing lost.
        assert received == count + limited
        # One budget: far fewer 429s than one per replica's overshoot (without the store the
        # same burst sees most of its requests refused once). Usually 1; up to 14 seen when the
        # burst's proof happens to fit the quantized upstream and every replica then believes
        # the whole 240 at once (a known weakness of the proof, open on issue 17).
        notable = [line for replica in replicas for line in replica.lines
                   if "sluice::access" not in line and ("429" in line or "burst" in line or "learn" in line)]
        if limited > 3:
            print("\n".join(notable[-40:]))
        assert limited <= count // 2, stats["status_counts"]
        shared = [line for line in replicas[1].lines + replicas[2].lines if "another replica learned" in line]
        assert shared, "a later replica took the learned limit from the store"
    finally:
        codes = [replica.stop() for replica in replicas]
        mock.stop()
    assert codes == [0, 0, 0]
    for replica in replicas:
        assert not any(KEY in line for line in replica.lines), "the API key reached the log"


def redis_cli(url, *args):
    port = url.rsplit(":", 1)[1].split("/")[0]
    return subprocess.run(["redis-cli", "-p", port, *map(str, args)], capture_output=True, text=True,
                          check=True, timeout=10).stdout.split()


def metric(replica, name):
    with urllib.request.urlopen(replica.url + "/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def test_a_replica_killed_holding_reservations_leaks_nothing(redis_url):
    # Generations that take 3 s: the killed replica holds their reservations when it dies.
    mock = start_mock("--rpm", 60, "--chunk-delay-ms", 300)
    replicas = [start_replica(mock.url, redis_url) for _ in range(2)]
    killed, survivor = replicas
    try:
        assert asyncio.run(spread([survivor], 1)) == [None]
        assert asyncio.run(spread([killed], 1)) == [None]
        deadline = time.monotonic() + 10
        while metric(survivor, "sluice_shared_replicas") != 2:
            assert time.monotonic() < deadline, "the replicas never saw each other"
            time.sleep(0.2)

        def slow_streams():
            client = openai.OpenAI(base_url=killed.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
            try:
                for _ in client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10,
                                                        stream=True):
                    pass
            except openai.APIError:
                pass

        threads = [threading.Thread(target=slow_streams, daemon=True) for _ in range(5)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while control(mock, "/_mock/stats")["in_flight"] < 5:
            assert time.monotonic() < deadline, "the streams never started"
            time.sleep(0.05)
        killed.proc.kill()
        killed.proc.wait()
        # The survivor stops counting it within the heartbeats' 5 s: were the store to go
        # away now, its share would be the whole limit, not half.
        deadline = time.monotonic() + 10
        while metric(survivor, "sluice_shared_replicas") != 1:
            assert time.monotonic() < deadline, "the dead replica is still counted alive"
            time.sleep(0.2)
        # Nothing it left in the store lives forever: every key has a TTL. Its reservations'
        # cost is in the bucket's level, which refills: the survivor is admitted.
        keys = redis_cli(redis_url, "--scan", "--pattern", "sluice:*")
        assert keys, "the replicas stored nothing"
        for key in keys:
            ttl = int(redis_cli(redis_url, "PTTL", key)[0])
            assert ttl > 0, f"{key} never expires ({ttl})"
        assert asyncio.run(spread([survivor], 3)) == [None, None, None]
    finally:
        codes = [replica.stop() for replica in replicas]
        mock.stop()
    assert codes[1] == 0, "the survivor exits 0"
