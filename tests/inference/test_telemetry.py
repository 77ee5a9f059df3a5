"""What an operator sees: /metrics after real requests, request ids in the response and in every
log line of a request (the web thread's and the engine's), and /api/ready's checks."""

import json
import logging
import socket
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from genapi.health import worker_seen_record
from inference.telemetry import JsonFormatter, RequestIdFilter

PRODUCT = {"name": "Trail Running Shoe", "category": "Shoes", "color": "Grey"}


def scrape(client, **headers):
    response = client.get("/metrics", **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=")
    return response.content.decode()


def samples(text):
    """{(sample name, frozenset of labels): value} of an exposition text."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(values, name, **labels):
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(value for (sample, tags), value in values.items() if sample == name and wanted <= tags)


def generate(client, auth, body, **headers):
    return client.post("/api/generate", data=json.dumps(body), content_type="application/json", **auth, **headers)


@pytest.fixture
def json_log(caplog):
    """The log as production writes it: one JSON object a line, request ids stamped as logged."""
    caplog.set_level(logging.INFO)
    caplog.handler.setFormatter(JsonFormatter())
    caplog.handler.addFilter(RequestIdFilter())

    def lines():
        return [json.loads(line) for line in caplog.text.splitlines() if line.strip()]

    return lines


def test_a_generation_moves_the_request_token_and_first_token_metrics(client, auth, base_version):
    before = samples(scrape(client))
    response = generate(client, auth, {"product": PRODUCT, "max_new_tokens": 12})
    assert response.status_code == 200
    completion_tokens = response.json()["usage"]["completion_tokens"]
    assert completion_tokens > 0
    after = samples(scrape(client))

    def moved(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    route = {"route": "api/generate", "method": "POST"}
    assert moved("genapi_http_requests_total", **route, status="200") == 1
    assert moved("genapi_http_request_duration_seconds_count", **route) == 1
    assert moved("genapi_http_request_duration_seconds_sum", **route) > 0
    assert moved("genapi_generated_tokens_total") == completion_tokens
    assert moved("genapi_time_to_first_token_seconds_count") == 1
    # The version was loaded by this request: counted and timed.
    assert moved("genapi_model_loads_total", outcome="ok") == 1
    assert moved("genapi_model_load_duration_seconds_count") == 1
    # Idle again: nothing waits, nothing runs.
    assert total(after, "genapi_engine_queue_depth") == 0
    assert total(after, "genapi_engine_running_sequences") == 0
    # The database's side is in the same scrape.
    assert total(after, "genapi_database_up") == 1
    assert ("genapi_jobs", frozenset({("state", "running")})) in after


def test_routes_are_url_patterns_never_raw_paths(db, client):
    before = samples(scrape(client))
    client.get("/api/no-such-thing/12345")
    client.get("/api/no-such-thing/67890")
    client.generic("BREW", "/api/health")
    text = scrape(client)
    assert "12345" not in text and "no-such-thing" not in text
    after = samples(text)

    def moved(**labels):
        return total(after, "genapi_http_requests_total", **labels) - total(
            before, "genapi_http_requests_total", **labels
        )

    assert moved(route="^(?:api|v1)/", status="404") == 2
    assert moved(route="api/health", method="other", status="405") == 1


def test_a_metrics_token_keeps_others_out(db, client, settings):
    settings.METRICS_TOKEN = "s3cret-token"
    refused = client.get("/metrics")
    assert refused.status_code == 401 and refused["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert "genapi_http_requests_total" in scrape(client, HTTP_AUTHORIZATION="Bearer s3cret-token")


def test_the_request_id_comes_back_and_is_on_every_log_line_of_the_request(client, auth, base_version, json_log):
    given = "req-7f3a9c2e.trace:42"
    response = generate(client, auth, {"product": PRODUCT, "max_new_tokens": 4}, HTTP_X_REQUEST_ID=given)
    assert response.status_code == 200
    assert response["X-Request-ID"] == given
    lines = json_log()
    ours = [line for line in lines if line.get("request_id") == given]
    # The web thread loaded the version for this request; the engine's scheduler thread ended its sequence.
    assert any(line["logger"] == "inference.loader" and "Loaded model version" in line["message"] for line in ours)
    [done] = [line for line in ours if line["logger"] == "inference.engine"]
    assert done["message"].startswith("Sequence 0 done") and done["thread"].startswith("genapi-")
    assert done["tokens"] == response.json()["usage"]["completion_tokens"]
    # Every line the request caused carries its id, and lines after it do not.
    assert all(line.get("request_id") == given for line in lines)
    client.get("/api/health")
    assert not any(line.get("request_id") == given for line in json_log()[len(lines) :])


def test_a_refused_request_is_logged_with_its_id(db, client, json_log):
    # Django logs a 4xx answer after the middleware is done with the request: the id is still there.
    client.get("/api/no-such-route", HTTP_X_REQUEST_ID="lost-1")
    [line] = [line for line in json_log() if line["logger"] == "django.request"]
    assert line["message"] == "Not Found: /api/no-such-route" and line["request_id"] == "lost-1"


def test_a_stream_carries_its_request_id_and_is_counted_when_it_ends(client, auth, base_version, json_log):
    before = samples(scrape(client))
    response = generate(
        client, auth, {"product": PRODUCT, "max_new_tokens": 6, "stream": True}, HTTP_X_REQUEST_ID="stream-1"
    )
    assert response.status_code == 200 and response["X-Request-ID"] == "stream-1"
    route = {"route": "api/generate", "method": "POST"}
    counted = total(before, "genapi_http_requests_total", **route)
    # Not counted while it streams: its duration is the whole stream's.
    assert total(samples(scrape(client)), "genapi_http_requests_total", **route) == counted
    body = b"".join(response.streaming_content).decode()  # the test client closes it at the end, as a server does
    assert "event: done" in body
    engine = [line for line in json_log() if line["logger"] == "inference.engine"]
    assert engine and all(line.get("request_id") == "stream-1" for line in engine)
    assert total(samples(scrape(client)), "genapi_http_requests_total", **route) == counted + 1


@pytest.mark.parametrize(
    "bad",
    ["x" * 65, "two words", "evil\\nforged", 'quote"d', "ünïcode", "a;b"],
)
def test_an_unsafe_request_id_is_replaced(client, bad):
    response = client.get("/api/health", HTTP_X_REQUEST_ID=bad)
    replaced = response["X-Request-ID"]
    assert replaced != bad and len(replaced) == 32 and replaced.isalnum()


def test_without_a_request_id_each_request_gets_its_own(client):
    first, second = client.get("/api/health")["X-Request-ID"], client.get("/api/health")["X-Request-ID"]
    assert first and second and first != second


# --- /api/ready ----------------------------------------------------------------------


def _closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ready_reports_each_check_and_fails_only_on_the_required_ones(client, base_version, settings, tmp_path):
    from inference import loader

    loader.model_get(base_version)
    settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{_closed_port()}/0"
    settings.MODEL_STORE = tmp_path / "gone"
    settings.VAR_DIR = tmp_path  # where the workers' stamps are when the cache is this process's own: none here
    started = time.monotonic()
    response = client.get("/api/ready")
    assert time.monotonic() - started < 2.5  # a probe answers within a couple of seconds
    body = response.json()
    # Serving works: the rest is reported, not failed on.
    assert response.status_code == 200 and body["ready"] is True
    checks = body["checks"]
    assert checks["database"] == "ok" and checks["model"] == f"ok: {base_version.name}"
    assert checks["broker"] == "unreachable (the log says why)"
    assert checks["training_worker"] == "no training worker has been seen"
    assert checks["evaluation_worker"] == "no evaluation worker has been seen"
    assert checks["model_store"] == "the model store's directory does not exist"
    assert set(body["warnings"]) == {
        "broker: unreachable (the log says why)",
        "training_worker: no training worker has been seen",
        "evaluation_worker: no evaluation worker has been seen",
        "model_store: the model store's directory does not exist",
    }
    assert "127.0.0.1" not in json.dumps(body)


def test_ready_says_all_is_well_with_a_broker_folder_workers_and_a_store(client, base_version, settings, tmp_path):
    from inference import loader

    loader.model_get(base_version)
    queue = tmp_path / "queue"
    queue.mkdir()
    settings.CELERY_BROKER_URL = "filesystem://"
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"data_folder_in": str(queue), "data_folder_out": str(queue)}
    settings.VAR_DIR = tmp_path  # the workers' stamps are files there when the cache is this process's own
    worker_seen_record(["training", "evaluation"])
    body = client.get("/api/ready").json()
    assert body["ready"] is True and body["warnings"] == [], body
    assert body["checks"]["broker"] == "ok" and body["checks"]["model_store"] == "ok"
    assert body["checks"]["training_worker"].startswith("ok: ") and "pid" in body["checks"]["training_worker"]
    # A worker silent for longer than WORKER_SEEN_WITHIN_SECONDS is reported missing, by name.
    settings.WORKER_SEEN_WITHIN_SECONDS = 0
    time.sleep(0.05)
    late = client.get("/api/ready").json()
    assert late["ready"] is True
    assert late["checks"]["training_worker"].startswith("no training worker seen for")
    queue.rmdir()
    assert client.get("/api/ready").json()["checks"]["broker"] == (
        "the filesystem broker's folder is missing or not writable"
    )


def test_ready_fails_without_an_active_version_and_still_reports_the_rest(db, client, settings, tmp_path):
    settings.VAR_DIR = tmp_path
    response = client.get("/api/ready")
    assert response.status_code == 503 and response.json()["ready"] is False
    assert set(response.json()["checks"]) == {
        "database", "model", "broker", "training_worker", "evaluation_worker", "model_store",
    }  # fmt: skip


def test_the_serving_image_reports_no_broker_and_no_workers(client, base_version, settings):
    from inference import loader

    loader.model_get(base_version)
    settings.SERVING_ONLY = True
    body = client.get("/api/ready").json()
    assert body["ready"] is True and body["warnings"] == []
    assert set(body["checks"]) == {"database", "model", "model_store"}
