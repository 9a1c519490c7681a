"""The official openai SDK, unchanged, through sluice to the mock upstream."""

import openai
import pytest

from conftest import KEY, Process, SLUICE_BIN, control


def test_chat(client, mock):
    completion = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=8,
    )
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content
    assert completion.usage.completion_tokens == 8
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 8
    received = control(mock, "/_mock/stats")["received"]
    assert [r["path"] for r in received] == ["/v1/chat/completions"]
    headers = {name.lower(): value for name, value in received[0]["headers"]}
    # The mock records keys redacted; it answers 401 without one, so the 200 shows it arrived.
    assert "authorization" in headers
    assert received[0]["org"].startswith("org-")
    assert headers["x-stainless-retry-count"] == "0"


def test_chat_raw_response_keeps_rate_limit_headers(client):
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert int(raw.headers["x-ratelimit-limit-requests"]) > 0
    assert "x-ratelimit-reset-tokens" in raw.headers
    assert raw.parse().choices[0].message.content


def test_streaming_chat(client):
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Count"}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 12
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 12


@pytest.mark.parametrize(
    "value, tokens",
    [("hello world", None), (["a", "bb", "ccc"], None), ([1, 2, 3, 4], 4), ([[1, 2], [3, 4, 5]], 5)],
)
def test_embeddings(client, value, tokens):
    result = client.embeddings.create(model="text-embedding-3-small", input=value)
    expected = len(value) if isinstance(value, list) and not isinstance(value[0], int) else 1
    assert len(result.data) == expected
    assert all(len(item.embedding) > 0 for item in result.data)
    if tokens is not None:
        assert result.usage.prompt_tokens == tokens


def test_responses(client):
    response = client.responses.create(model="gpt-4o-mini", input="Write one line", max_output_tokens=6)
    assert response.status == "completed"
    assert len(response.output_text.split()) == 6
    assert response.usage.output_tokens == 6


def test_streaming_responses(client):
    events = list(
        client.responses.create(model="gpt-4o-mini", input="Stream please", max_output_tokens=5, stream=True)
    )
    assert events[-1].type == "response.completed"
    assert events[-1].response.usage.output_tokens == 5
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) == 5


def test_models(client):
    models = client.models.list()
    assert len(models.data) > 0
    assert client.models.retrieve(models.data[0].id).id == models.data[0].id


def test_quota_error_surfaces_as_rate_limit_error(client, mock):
    control(mock, "/_mock/faults", {"fault": {"kind": "insufficient_quota"}})
    # A key of its own: sluice answers its org from the quota cool-down for a minute after.
    broke = client.with_options(api_key="sk-e2e-out-of-quota-000000000000000", max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        broke.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 429
    assert caught.value.code == "insufficient_quota"


def test_an_upstream_rate_limit_is_replayed_by_sluice(client, mock):
    """The SDK never sees the upstream's 429: sluice waits the hinted time and sends again."""
    before = control(mock, "/_mock/stats")
    control(mock, "/_mock/faults", {"fault": {"kind": "rate_limit", "resource": "tokens", "retry_after": True}})
    completion = client.with_options(max_retries=0).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert completion.choices[0].message.content
    after = control(mock, "/_mock/stats")
    assert after["requests"] - before["requests"] == 2
    assert after["status_counts"].get("429", 0) - before["status_counts"].get("429", 0) == 1


def test_bad_key_surfaces_as_authentication_error(client, mock):
    body = {
        "error": {
            "message": "Incorrect API key provided.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    control(mock, "/_mock/faults", {"fault": {"kind": "status", "status": 401, "body": body}})
    with pytest.raises(openai.AuthenticationError) as caught:
        client.models.list()
    assert caught.value.code == "invalid_api_key"


def test_a_server_error_is_retried_by_sluice(sluice, mock, monkeypatch):
    """A 500 before any byte reached the client is retried by sluice itself: the SDK's one
    attempt (retry count 0) reaches the upstream twice."""
    monkeypatch.setenv("OPENAI_BASE_URL", sluice.url + "/v1")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    before = len(control(mock, "/_mock/stats")["received"])
    control(mock, "/_mock/faults", {"fault": {"kind": "status", "status": 500}})
    client = openai.OpenAI(max_retries=0)
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert completion.choices[0].message.content
    received = control(mock, "/_mock/stats")["received"][before:]
    retry_counts = [dict((n.lower(), v) for n, v in r["headers"])["x-stainless-retry-count"] for r in received]
    assert retry_counts == ["0", "0"]


def test_unreachable_upstream_surfaces_as_a_502(monkeypatch):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    proxy = Process([SLUICE_BIN, "--listen", "127.0.0.1:0", "--upstream", f"http://127.0.0.1:{closed_port}"])
    try:
        monkeypatch.setenv("OPENAI_BASE_URL", proxy.url + "/v1")
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        client = openai.OpenAI(max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 502
        assert caught.value.code == "upstream_unreachable"
    finally:
        assert proxy.stop() == 0
