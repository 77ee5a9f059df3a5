"""Per-key limits, the daily quota and sign-in throttling, as a client meets them."""

import base64
import datetime
import json
import urllib.error
import urllib.request

import pytest
import redis
from django.contrib.auth.models import User
from django.core.cache import cache

from inference import limits
from inference.services.usage import usage_record

PRODUCT = {"name": "Trail Running Shoe", "color": "Grey"}
SAMPLED = {"prompt": "Describe a scarf.", "temperature": 1.0, "seed": 5}


def _generate(client, header, **body):
    return client.post(
        "/api/generate",
        data=json.dumps({**SAMPLED, "max_new_tokens": 8, **body}),
        content_type="application/json",
        **header,
    )


class FixedClock:
    def __init__(self, when):
        self.now = when.timestamp()

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fixed = FixedClock(datetime.datetime(2026, 12, 2, 23, 59, 0, tzinfo=datetime.UTC))
    monkeypatch.setattr(limits, "clock", fixed)
    return fixed


# --- Requests per minute --------------------------------------------------------------


def test_over_the_requests_per_minute_a_429_names_the_limit_with_retry_after(client, base_version, key_factory):
    key, header = key_factory(requests_per_minute=3)
    statuses = [client.get("/api/usage", **header).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    refused = client.get("/api/usage", **header)
    assert refused.status_code == 429
    body = refused.json()
    assert body["limit"] == "requests_per_minute" and "3 requests per minute" in body["detail"]
    # A sliding window: this minute's requests still count, in part, into the next one.
    assert 1 <= int(refused["Retry-After"]) <= 120 and body["retry_after"] == int(refused["Retry-After"])
    assert _generate(client, header).status_code == 429  # every route of the key shares the limit
    _, other = key_factory(name="other", requests_per_minute=3)
    assert client.get("/api/usage", **other).status_code == 200  # limits are per key


def test_wrong_secrets_and_refused_requests_do_not_spend_a_keys_limit(client, base_version, key_factory):
    key, header = key_factory(scopes="models:read", requests_per_minute=2)
    forged = {"HTTP_AUTHORIZATION": header["HTTP_AUTHORIZATION"][:-4] + "AAAA"}  # the prefix is no secret
    assert {client.get("/api/usage", **forged).status_code for _ in range(5)} == {401}
    assert {_generate(client, header).status_code for _ in range(5)} == {403}  # no generate scope
    assert [client.get("/api/usage", **header).status_code for _ in range(3)] == [200, 200, 429]


def test_the_window_slides_the_limit_frees_up_as_the_minute_passes(client, base_version, key_factory, clock):
    key, header = key_factory(requests_per_minute=2)
    clock.now = 1_800_000_000 - 1_800_000_000 % 60 + 30  # halfway through a minute
    assert [client.get("/api/usage", **header).status_code for _ in range(3)] == [200, 200, 429]
    clock.advance(45)  # the next minute, 15 s in: the last minute's two count for 3/4 of one
    refused = client.get("/api/usage", **header)
    assert refused.status_code == 429 and int(refused["Retry-After"]) == 15
    clock.advance(15)  # half of them left in the window: room for one
    assert [client.get("/api/usage", **header).status_code for _ in range(2)] == [200, 429]


def test_the_retry_after_of_a_sliding_window():
    window = limits._Window("k", previous=10, current=0, fraction=0.5, period=60)  # 5 of the previous still count
    assert window.retry_after(10) == 0
    window = limits._Window("k", previous=10, current=6, fraction=0.5, period=60)  # 11 now
    assert window.retry_after(10) == 12  # at 0.7: 10 * 0.3 + 6 = 9 (+1 fits)
    window = limits._Window("k", previous=0, current=10, fraction=0.25, period=60)
    assert window.retry_after(10) == 51  # 45 s to the next window, then 10 x (1 - g) <= 9: g = 0.1


# --- Tokens per minute and the daily quota ---------------------------------------------


def test_over_the_generated_tokens_per_minute_a_429_names_the_limit(client, base_version, key_factory):
    key, header = key_factory(tokens_per_minute=20)
    used, answers = 0, []
    for _ in range(6):
        response = _generate(client, header)
        if response.status_code != 200:
            break
        answers.append(response)
        used += response.json()["usage"]["completion_tokens"]
    assert response.status_code == 429, "the limit never held"
    assert response.json()["limit"] == "tokens_per_minute" and int(response["Retry-After"]) >= 1
    # Let in while a token was left; refused once 20 were generated.
    assert used >= 20 and used - answers[-1].json()["usage"]["completion_tokens"] < 20
    assert answers[0]["X-RateLimit-Limit-Tokens"] == "20"


def test_the_daily_quota_runs_out_and_renews_the_next_day(client, base_version, key_factory, clock):
    key, header = key_factory(daily_token_quota=10)
    first = _generate(client, header)
    second = _generate(client, header)
    assert first.status_code == 200 and second.status_code == 200
    spent = sum(r.json()["usage"]["completion_tokens"] for r in (first, second))
    if spent < 10:  # the tiny model may end an answer early; spend the rest
        _generate(client, header, max_new_tokens=10 - spent)
    refused = _generate(client, header)
    assert refused.status_code == 429 and refused.json()["limit"] == "daily_token_quota"
    assert int(refused["Retry-After"]) == 60  # 23:59 UTC: it renews at midnight
    clock.advance(61)  # 00:00:01 the next day
    assert _generate(client, header).status_code == 200
    days = client.get("/api/usage", **header).json()["days"]
    assert [day["day"] for day in days] == ["2026-12-03", "2026-12-02"]


def test_the_quota_survives_a_lost_cache(client, base_version, key_factory):
    key, header = key_factory(daily_token_quota=50)
    usage_record(key_id=key.pk, completion_tokens=50)  # spent earlier today, in another process
    cache.clear()  # a Redis restart without persistence
    refused = _generate(client, header)
    assert refused.status_code == 429 and refused.json()["limit"] == "daily_token_quota"


def test_a_cache_outage_lets_requests_through(client, base_version, key_factory, monkeypatch, caplog):
    key, header = key_factory(requests_per_minute=1, tokens_per_minute=1)

    class Down:
        def __getattr__(self, name):
            raise ConnectionError("the cache is down")

    monkeypatch.setattr(limits, "cache", Down())
    assert [_generate(client, header).status_code for _ in range(2)] == [200, 200]
    assert "Limits not enforced: the cache failed" in caplog.text


# --- Across processes -------------------------------------------------------------------


@pytest.fixture
def shared_cache(settings):
    """The tests' cache on a Redis database of its own, shared with a second web process."""
    url = "redis://127.0.0.1:6379/13"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError:
        pytest.skip(f"no Redis at {url} for a cache two processes share (CI starts one)")
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": url}}
    cache.clear()
    yield url
    cache.clear()


def _call(url, path, header, body=None):
    request = urllib.request.Request(
        url + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": header["HTTP_AUTHORIZATION"], "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.django_db(transaction=True)
def test_limits_hold_across_two_processes_sharing_the_cache(
    base_version, key_factory, live_server, shared_cache, tmp_path
):
    from tests.server import web_process

    _, requests_key = key_factory(requests_per_minute=4)
    _, tokens_key = key_factory(name="tokens", tokens_per_minute=20)
    with web_process(tmp_path / "web.log", CACHE_URL=shared_cache) as other:
        servers = [live_server.url, other]
        # Two requests to each process: the fifth is refused by either.
        assert [_call(servers[i % 2], "/api/usage", requests_key)[0] for i in range(4)] == [200] * 4
        assert _call(other, "/api/usage", requests_key)[0] == 429
        status, body = _call(live_server.url, "/api/usage", requests_key)
        assert status == 429 and body["limit"] == "requests_per_minute"

        used, statuses = 0, []
        for i in range(8):
            status, body = _call(servers[i % 2], "/api/generate", tokens_key, {**SAMPLED, "max_new_tokens": 8})
            statuses.append(status)
            if status != 200:
                break
            used += body["usage"]["completion_tokens"]
        assert status == 429 and body["limit"] == "tokens_per_minute" and used >= 20
        assert statuses.count(200) >= 3  # both processes served and counted into one limit


# --- Sign-in throttling -----------------------------------------------------------------


def _basic(username, password):
    return {"HTTP_AUTHORIZATION": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}


@pytest.fixture
def person(django_user_model):
    from django.contrib.auth.models import Permission

    user = django_user_model.objects.create_user("trainer", password="s3cret-pass")
    user.user_permissions.add(*Permission.objects.filter(codename="view_finetuningjob"))
    return user


def test_failed_basic_sign_ins_are_throttled_per_address_without_hashing(client, person, settings, monkeypatch):
    settings.LOGIN_FAILURE_LIMIT = 3
    for _ in range(3):
        assert client.get("/api/jobs", **_basic("trainer", "guess")).status_code == 401
    hashed = []
    check = User.check_password
    monkeypatch.setattr(User, "check_password", lambda self, raw: hashed.append(raw) or check(self, raw))
    refused = client.get("/api/jobs", **_basic("trainer", "s3cret-pass"))
    assert refused.status_code == 429 and refused.json()["limit"] == "failed_logins"
    assert int(refused["Retry-After"]) >= 1 and hashed == []  # refused before any password hash
    other = client.get("/api/jobs", REMOTE_ADDR="10.0.0.9", **_basic("trainer", "s3cret-pass"))
    assert other.status_code == 200  # another address is not held up
    assert client.get("/api/jobs", **_basic("trainer\x00", "x")).status_code == 429  # and a NUL is no 500


def test_forwarded_for_counts_only_behind_a_trusted_proxy(client, person, settings):
    settings.LOGIN_FAILURE_LIMIT = 2
    # A client that writes its own X-Forwarded-For is still counted by its address.
    for i in range(2):
        client.get("/api/jobs", HTTP_X_FORWARDED_FOR=f"203.0.113.{i}", **_basic("trainer", "guess"))
    assert client.get("/api/jobs", HTTP_X_FORWARDED_FOR="203.0.113.99", **_basic("trainer", "x")).status_code == 429
    # Behind a trusted proxy, each forwarded client is counted on its own.
    settings.TRUSTED_PROXIES = ["10.1.0.0/16"]
    proxy = {"REMOTE_ADDR": "10.1.2.3"}
    for _ in range(2):
        client.get("/api/jobs", HTTP_X_FORWARDED_FOR="198.51.100.7", **proxy, **_basic("trainer", "guess"))
    blocked = client.get("/api/jobs", HTTP_X_FORWARDED_FOR="198.51.100.7", **proxy, **_basic("trainer", "x"))
    other = client.get("/api/jobs", HTTP_X_FORWARDED_FOR="198.51.100.8", **proxy, **_basic("trainer", "s3cret-pass"))
    assert blocked.status_code == 429 and other.status_code == 200


def test_the_client_address_reads_forwarded_for_from_trusted_proxies_only(settings):
    settings.TRUSTED_PROXIES = ["10.0.0.1", "10.2.0.0/16"]
    meta = {"REMOTE_ADDR": "10.0.0.1", "HTTP_X_FORWARDED_FOR": "1.1.1.1, 203.0.113.5, 10.2.3.4"}
    assert limits.client_address(meta) == "203.0.113.5"  # the nearest address that is not a proxy
    assert limits.client_address({**meta, "REMOTE_ADDR": "192.0.2.1"}) == "192.0.2.1"
    assert limits.client_address({"REMOTE_ADDR": "10.0.0.1"}) == "10.0.0.1"


def test_the_admin_sign_in_page_is_throttled_too(client, admin_user, settings):
    settings.LOGIN_FAILURE_LIMIT = 2
    for _ in range(2):
        page = client.post("/admin/login/", {"username": "admin", "password": "wrong"})
        assert "Please enter the correct username and password" in page.content.decode()
    page = client.post("/admin/login/", {"username": "admin", "password": "password"})
    assert "Too many failed sign-ins from this address" in page.content.decode()
    assert "_auth_user_id" not in client.session
