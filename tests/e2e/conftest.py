"""End-to-end harness: the built mock-openai and sluice binaries on port 0, and the official
openai SDK pointed at sluice through OPENAI_BASE_URL, as an application would be."""

import json
import os
import re
import signal
import subprocess
import threading
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug"
SLUICE_BIN = os.environ.get("SLUICE_BIN", str(TARGET / "sluice"))
MOCK_BIN = os.environ.get("MOCK_BIN", str(TARGET / "mock-openai"))
KEY = "sk-e2e-0123456789abcdef0123456789abcdef"
LISTENING = re.compile(r"listening on http://([0-9.]+:\d+)")


class Process:
    """A child process whose output is collected line by line on a thread."""

    def __init__(self, args, env=None, stream="stderr"):
        self.lines = []
        self._found = threading.Event()
        self.addr = None
        self.proc = subprocess.Popen(
            args,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE if stream == "stdout" else subprocess.DEVNULL,
            stderr=subprocess.PIPE if stream == "stderr" else subprocess.DEVNULL,
            text=True,
        )
        pipe = self.proc.stdout if stream == "stdout" else self.proc.stderr
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()
        if not self._found.wait(timeout=20):
            self.stop()
            raise RuntimeError(f"{args[0]} did not start: {self.lines}")

    def _read(self, pipe):
        for line in pipe:
            self.lines.append(line.rstrip("\n"))
            match = LISTENING.search(line)
            if match and self.addr is None:
                self.addr = match.group(1)
                self._found.set()

    @property
    def url(self):
        return f"http://{self.addr}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise
        return self.proc.returncode


def control(mock, path, payload=None):
    """Calls one of the mock's /_mock/* control routes."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(
        mock.url + path,
        data=data,
        method="GET" if data is None and path.endswith("stats") else "POST",
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    return json.loads(body) if body else None


def start_mock(*flags):
    """A mock-openai of one's own, with command-line flags such as `"--rpm", 120`."""
    return Process([MOCK_BIN, "--listen", "127.0.0.1:0", *map(str, flags)], stream="stdout")


def start_sluice(upstream, config=None, rust_log="info"):
    """A sluice of one's own in front of `upstream` (a URL); with `config` None it runs with no
    configuration file at all, whatever SLUICE_CONFIG the environment holds."""
    args = [SLUICE_BIN, "--listen", "127.0.0.1:0", "--upstream", upstream]
    if config is not None:
        args += ["--config", str(config)]
    return Process(args, env={"RUST_LOG": rust_log, "SLUICE_CONFIG": ""})


@pytest.fixture(scope="session")
def mock():
    process = Process([MOCK_BIN, "--listen", "127.0.0.1:0"], stream="stdout")
    yield process
    process.stop()


@pytest.fixture(scope="session")
def sluice(mock):
    process = Process(
        [SLUICE_BIN, "--listen", "127.0.0.1:0", "--upstream", mock.url],
        env={"RUST_LOG": "info", "SLUICE_CONFIG": ""},
    )
    yield process
    code = process.stop()
    assert code == 0, "sluice exits 0 on SIGTERM"
    assert not any(KEY in line for line in process.lines), "the API key reached the log"


@pytest.fixture(autouse=True)
def fresh_mock(mock):
    control(mock, "/_mock/reset")
    yield


@pytest.fixture
def client(sluice, monkeypatch):
    """An OpenAI client configured the way applications are: by environment only."""
    import openai

    monkeypatch.setenv("OPENAI_BASE_URL", sluice.url + "/v1")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    return openai.OpenAI(max_retries=0)
