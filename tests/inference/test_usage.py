"""What each key used, per day: recorded by every route, shown to the key and in the admin."""

import json

import pytest

from inference.models import ApiKeyUsage
from tests.worker import wait_for

SAMPLED = {"prompt": "Describe a scarf.", "temperature": 1.0, "seed": 5, "max_new_tokens": 8}


def _post(client, header, body, path="/api/generate"):
    return client.post(path, data=json.dumps(body), content_type="application/json", **header)


def test_usage_counts_requests_tokens_and_errors_per_key(client, base_version, key_factory):
    key, header = key_factory()
    answer = _post(client, header, SAMPLED).json()
    assert _post(client, header, {**SAMPLED, "temperature": 9}).status_code == 400
    streamed = _post(client, header, {**SAMPLED, "seed": 6, "stream": True})
    events = b"".join(streamed.streaming_content).decode()
    done = json.loads(events.split("event: done\ndata: ")[1])
    row = ApiKeyUsage.objects.get(key=key)
    assert (row.requests, row.errors) == (3, 1)
    assert row.prompt_tokens == answer["usage"]["prompt_tokens"] + done["usage"]["prompt_tokens"]
    assert row.completion_tokens == answer["usage"]["completion_tokens"] + done["usage"]["completion_tokens"]


def test_the_openai_routes_count_alike(client, base_version, key_factory):
    key, header = key_factory()
    body = {"model": "active", "messages": [{"role": "user", "content": "Describe a scarf."}], "max_tokens": 6}
    answer = _post(client, header, {**body, "seed": 1}, "/v1/chat/completions").json()
    _post(client, header, {**body, "logprobs": True}, "/v1/chat/completions")
    row = ApiKeyUsage.objects.get(key=key)
    assert (row.requests, row.errors, row.completion_tokens) == (2, 1, answer["usage"]["completion_tokens"])


def test_a_key_sees_its_own_usage_and_nobody_elses(client, base_version, key_factory):
    mine, header = key_factory(requests_per_minute=100, tokens_per_minute=5000, daily_token_quota=90000)
    other, other_header = key_factory(name="other")
    _post(client, header, SAMPLED)
    _post(client, other_header, SAMPLED)
    _post(client, other_header, SAMPLED)
    body = client.get("/api/usage?days=7", **header).json()
    assert body["key"]["prefix"] == mine.prefix and body["key"]["name"] == "test client"
    [today] = body["days"]
    assert today["requests"] == 1 and today["completion_tokens"] > 0
    assert body["limits"]["requests_per_minute"] == {"limit": 100, "used": 2}  # this request included
    assert body["limits"]["daily_token_quota"] == {"limit": 90000, "used": today["completion_tokens"]}
    assert client.get("/api/usage?days=0", **header).status_code == 400
    assert client.get("/api/usage?days=2.5", **header).status_code == 400


def test_the_admin_shows_usage_per_key_and_day(admin_client, base_version, key_factory, client):
    key, header = key_factory()
    _post(client, header, SAMPLED)
    listing = admin_client.get("/admin/inference/apikeyusage/").content.decode()
    assert "test client" in listing and key.prefix in listing
    page = admin_client.get(f"/admin/inference/apikey/{key.pk}/change/").content.decode()
    assert "Usage, last 14 days" in page and "generated tokens" in page


@pytest.mark.django_db(transaction=True)  # the writer thread has its own connection
def test_a_process_tallies_usage_and_writes_it_in_batches(client, base_version, key_factory, settings):
    settings.USAGE_FLUSH_SECONDS = 0.2
    key, header = key_factory()
    for _ in range(3):
        assert client.get("/api/usage", **header).status_code == 200
    assert client.get("/api/usage?days=x", **header).status_code == 400
    assert wait_for(lambda: ApiKeyUsage.objects.filter(key=key, requests=4, errors=1).exists(), timeout=10)
    assert ApiKeyUsage.objects.filter(key=key).count() == 1  # one row per key and day, however many writes
