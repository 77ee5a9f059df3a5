"""Hostile input and faults as a client meets them: every malformed request is a JSON 4xx
naming the problem, a database outage a JSON 503 with Retry-After that names no host,
port or driver, and generation on the loaded active version goes on through it."""

import base64
import http.client
import json
import socket
import time
from unittest import mock
from urllib.parse import urlsplit

import pytest
from django.core.cache import cache
from django.db import OperationalError, connection

from finetuning.services.versions import VersionError, version_activate
from inference import loader
from inference.models import ApiKeyUsage
from inference.services import usage
from tests.server import web_process
from tests.worker import wait_for

PRODUCT = {"name": "Trail Running Shoe", "category": "Shoes", "color": "Grey"}
# What a real driver says when the database is down: the host and port must never reach a client.
DRIVER_MESSAGE = (
    'connection to server at "db.internal" (10.1.2.3), port 5432 failed: Connection refused\n'
    "\tIs the server running on that host and accepting TCP/IP connections?"
)
SECRETS = ("db.internal", "10.1.2.3", "5432", "Connection refused", "psycopg", "Traceback")


@pytest.fixture
def trainer(key_factory, django_user_model):
    """A key whose owner may run jobs: requests reach the body's parsing."""
    owner = django_user_model.objects.create_superuser("trainer", "trainer@example.com", "x")
    _, header = key_factory(owner=owner, requests_per_minute=10_000, tokens_per_minute=1_000_000)
    return header


def _json_error(response, status):
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json"), response.content[:200]
    return response.json()


NESTED = "[" * 100_000 + "]" * 100_000
ROUTES = ["/api/generate", "/api/jobs", "/v1/completions", "/v1/chat/completions"]


@pytest.mark.parametrize("path", ROUTES)
def test_json_nested_deeper_than_the_parser_goes_is_a_json_400(client, trainer, base_version, path):
    body = _json_error(client.post(path, data=NESTED, content_type="application/json", **trainer), 400)
    assert "nested too deeply" in json.dumps(body)


@pytest.mark.parametrize("path", ROUTES)
def test_a_10_mb_body_is_a_json_413(client, trainer, base_version, path):
    body = _json_error(
        client.post(path, data=b'{"prompt": "' + b"x" * 10_000_000 + b'"}', content_type="application/json", **trainer),
        413,
    )
    assert "larger than" in json.dumps(body)


@pytest.mark.parametrize("path", ROUTES)
def test_a_body_that_is_not_utf8_json_is_a_json_400(client, trainer, base_version, path):
    _json_error(client.post(path, data=b'{"prompt": "\xff\xfe"}', content_type="application/json", **trainer), 400)


def test_a_superscript_digit_is_a_name_not_an_id(client, trainer, base_version):
    # "²".isdigit() is True and int("²") raises: once a 500 from each of these fields.
    generate = client.post(
        "/api/generate",
        data=json.dumps({"product": PRODUCT, "model_version": "²"}),
        content_type="application/json",
        **trainer,
    )
    assert "no model version named '²'" in _json_error(generate, 404)["detail"]
    retrain = client.post("/api/jobs", data=json.dumps({"retrain": "²"}), content_type="application/json", **trainer)
    assert _json_error(retrain, 404)["detail"] == "retrain: no model version named '²'"
    chat = client.post(
        "/v1/chat/completions",
        data=json.dumps({"model": "²", "messages": [{"role": "user", "content": "Hi"}]}),
        content_type="application/json",
        **trainer,
    )
    assert _json_error(chat, 404)["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    "header",
    [
        "Basic " + base64.b64encode(b"admin\x00:password").decode(),
        "Basic " + base64.b64encode(b"admin:pass\x00word").decode(),
        "Basic " + base64.b64encode("ädmin:pässword".encode("latin-1")).decode(),
        "Basic !!!not base64!!!",
        "Bearer gk_abcdefgh\x00def",
        "Bearer gk_" + "x" * 5000,
        "Bearer one two",
    ],
)
def test_malformed_credentials_are_a_json_401(client, db, header):
    body = _json_error(client.get("/api/jobs", HTTP_AUTHORIZATION=header), 401)
    assert body["detail"]


@pytest.mark.parametrize(
    "path", ["/api/jobs/-391", "/api/jobs/99999999999999999999999999", "/api/jobs/1", "/api/nope", "/v1/nope"]
)
def test_unknown_ids_and_paths_are_json_404s(client, trainer, path):
    _json_error(client.get(path, **trainer), 404)
    _json_error(client.post(path + "/cancel", **trainer), 404)


# --- The database is down ---------------------------------------------------------


def _database_down():
    """Every query fails the way the driver fails when the server is down."""
    error = OperationalError(DRIVER_MESSAGE)
    failing = mock.Mock(side_effect=error)
    return mock.patch.multiple(connection, ensure_connection=failing, cursor=failing, chunked_cursor=failing)


def _cache_names():
    """The names in the local-memory cache the tests use, as given to cache.set."""
    return [key.split(":", 2)[-1] for key in cache._cache]


def _no_secrets(response):
    text = response.content.decode()
    assert not any(secret in text for secret in SECRETS), text


def test_a_database_outage_is_a_503_with_retry_after_and_names_no_host(client, trainer, admin_client, base_version):
    with _database_down():
        for path in ("/api/jobs", "/api/models", "/v1/models", "/api/usage"):
            response = client.get(path, **trainer)
            _no_secrets(response)
            assert response["Retry-After"] == "5"
            body = _json_error(response, 503)
            assert "database is unavailable" in json.dumps(body)
        assert _json_error(client.get("/v1/models", **trainer), 503)["error"]["type"] == "server_error"
        ready = client.get("/api/ready")
        _no_secrets(ready)
        assert _json_error(ready, 503)["checks"]["database"] == "unreachable (the log says why)"
        page = admin_client.get("/admin/finetuning/trainingexample/")
        _no_secrets(page)
        assert page.status_code == 503 and "Temporarily unavailable" in page.content.decode()
    assert client.get("/api/models", **trainer).status_code == 200  # and back at once


@pytest.mark.django_db(transaction=True)  # the usage writer's thread must see the key
def test_generation_goes_on_through_a_database_outage_with_the_loaded_active_version(client, trainer, base_version):
    def generate():
        return client.post(
            "/api/generate",
            data=json.dumps({"product": PRODUCT, "max_new_tokens": 4}),
            content_type="application/json",
            **trainer,
        )

    assert generate().status_code == 200  # reads the active version, loads it, caches the key
    # The key's cached copy is past its freshness (as an outage longer than a minute makes it):
    # it is still good enough while the database cannot say otherwise.
    name = next(k for k in _cache_names() if k.startswith("apikey:"))
    fields, owner_active, _ = cache.get(name)
    cache.set(name, (fields, owner_active, 0.0), 3600)
    with _database_down():
        during = generate()
        assert during.status_code == 200, during.content
        assert during.json()["model_version"]["name"] == base_version.name
        # A version that is not loaded cannot be looked up: a 503, not a 500.
        named = client.post(
            "/api/generate",
            data=json.dumps({"product": PRODUCT, "model_version": "other"}),
            content_type="application/json",
            **trainer,
        )
        _no_secrets(named)
        assert _json_error(named, 503)
    # The usage of the requests answered during the outage was kept, and is written once the
    # database is back (by the writer thread within seconds; here at once).
    usage.usage_flush()
    assert not usage._pending
    [row] = ApiKeyUsage.objects.all()
    assert (row.requests, row.errors, row.completion_tokens) == (3, 1, 8)


def test_a_database_outage_before_anything_is_loaded_is_a_503(client, trainer, base_version):
    with _database_down():
        response = client.post(
            "/api/generate",
            data=json.dumps({"product": PRODUCT}),
            content_type="application/json",
            **trainer,
        )
    _no_secrets(response)
    assert _json_error(response, 503)["detail"] == "the database is unavailable; try again in a few seconds"


@pytest.mark.django_db(transaction=True)
def test_the_web_starts_without_its_database_and_says_not_ready(tmp_path):
    """gunicorn with the deployment's config (docker/gunicorn.conf.py) and a database URL that
    points at a closed port: it starts, /api/health answers, /api/ready and every route that
    needs the database answer JSON 503s that name neither host nor port."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    log = tmp_path / "web.log"
    with web_process(
        log, config=True, DATABASE_URL=f"postgres://genapi:secret@127.0.0.1:{port}/genapi", GENERATE_ALLOW_ANONYMOUS="1"
    ) as url:
        address = urlsplit(url)

        def get(path, method="GET", body=None):
            conn = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
            headers = {"Content-Type": "application/json"}
            if path == "/api/jobs":  # a key the cache has never seen is looked up in the database
                headers["Authorization"] = "Bearer gk_abcdefgh_secret"
            if path == "/admin/":  # so is a session
                headers["Cookie"] = "sessionid=abcdefghijklmnopqrstuvwxyz012345"
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.getheader("Retry-After"), response.read().decode()

        assert get("/api/health")[0] == 200
        for method, path, body in [
            ("GET", "/api/ready", None),
            ("POST", "/api/generate", json.dumps({"product": PRODUCT})),
            ("GET", "/api/jobs", None),
            ("GET", "/admin/", None),
        ]:
            status, retry_after, text = get(path, method, body)
            assert status == 503, (path, status, text)
            assert not any(secret in text for secret in (str(port), "secret", "refused", "psycopg")), text
            if path != "/api/ready":
                assert retry_after == "5", path
        assert "the database is unavailable" in get("/api/generate", "POST", json.dumps({"product": PRODUCT}))[2]
    # What went wrong is in the log, for the operator.
    assert "The database is unavailable" in log.read_text()


# --- Clients that leave, and corrupt artifacts ------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_client_that_leaves_a_plain_request_frees_its_generation(tmp_path, base_version, key_factory):
    """Under gunicorn: a non-streaming request whose client hangs up is cancelled (its usage
    shows the few tokens made before), as a stream's is."""
    _, header = key_factory(requests_per_minute=10_000, tokens_per_minute=1_000_000)
    with web_process(tmp_path / "web.log", INFERENCE_MAX_BATCH="1") as url:
        address = urlsplit(url)
        auth = {"Authorization": header["HTTP_AUTHORIZATION"], "Content-Type": "application/json"}

        def request(body):
            conn = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
            conn.request("POST", "/api/generate", body=json.dumps(body), headers=auth)
            return conn

        # Warm the model, so that what follows measures the generation only.
        assert request({"product": PRODUCT, "max_new_tokens": 2}).getresponse().status == 200
        # Four sequences one after another (batch of one), each up to 900 tokens: seconds of work.
        body = {"prompt": "Describe a scarf.", "temperature": 1.0, "seed": 3, "max_new_tokens": 900}
        conn = request({**body, "num_return_sequences": 4})
        time.sleep(0.5)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()

        def usage():
            conn = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
            conn.request("GET", "/api/usage", headers=auth)
            return json.loads(conn.getresponse().read())["days"][0]

        # The cancelled request is recorded once it ends: at most a few hundred tokens, not 3,600.
        assert wait_for(lambda: usage()["requests"] >= 2, timeout=20)
        assert usage()["completion_tokens"] < 2 + 1500


def test_activation_refuses_a_version_whose_files_no_longer_match_its_manifest(loras, base_version, model_store):
    version = loras[0]
    adapter = model_store / version.artifact_path / loader.ADAPTER_WEIGHTS
    data = bytearray(adapter.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the weights
    adapter.write_bytes(bytes(data))
    with pytest.raises(VersionError) as refused:
        version_activate(version=version)
    message = str(refused.value)
    assert "adapter_model.safetensors does not match its sha256" in message
    assert str(model_store) not in message  # no server directories in a message
    base_version.refresh_from_db()
    assert base_version.is_active


@pytest.mark.django_db(transaction=True)  # the warm-up thread reads the active version
def test_ready_says_loading_until_the_active_version_is_in_memory(client, base_version):
    loader.cache_clear()
    first = client.get("/api/ready")
    assert first.status_code == 503 and first.json()["checks"]["model"] == f"loading {base_version.name}"
    # The probe never waits for the weights; it started loading them, and says so when done.
    assert wait_for(lambda: client.get("/api/ready").status_code == 200, timeout=30)
    assert client.get("/api/ready").json()["checks"]["model"] == f"ok: {base_version.name}"


@pytest.mark.django_db(transaction=True)
def test_the_access_log_escapes_what_clients_control(tmp_path, base_version):
    log = tmp_path / "web.log"
    forged = 'evil\n127.0.0.1 - admin [01/Jan/2026] "GET /admin/ HTTP/1.1" 200\x1b[2J'
    with web_process(log, config=True) as url:
        address = urlsplit(url)
        conn = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
        credentials = base64.b64encode(f"{forged}:password".encode()).decode()
        conn.request("GET", "/api/jobs", headers={"Authorization": f"Basic {credentials}", "User-Agent": 'ua"x'})
        assert conn.getresponse().status == 401
    text = log.read_text()
    [line] = [line for line in text.splitlines() if "GET /api/jobs HTTP" in line]  # the access log's
    assert "evil\\x0a127.0.0.1 - admin [01/Jan/2026] \\x22GET /admin/ HTTP/1.1\\x22 200\\x1b[2J" in line
    assert "ua\\x22x" in line
    assert "\x1b" not in text
